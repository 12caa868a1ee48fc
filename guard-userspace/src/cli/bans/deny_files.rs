//! Deny files: one address or prefix per line, `#` comments.

use std::{fs, path::Path};

use crate::policy::Cidr;

/// A line of a deny file that is neither an address, a prefix, blank nor a comment.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: `{text}` is not an address or prefix ({why})")]
pub struct BadLine {
    pub path: String,
    pub line: usize,
    pub text: String,
    pub why: String,
}

/// A deny file's sources: one address or prefix per line; `#` starts a comment. A file with
/// a bad line is refused whole (the sources it gave before stay in force).
pub fn parse_deny_file(text: &str, path: &str) -> Result<Vec<Cidr>, BadLine> {
    let mut sources = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let cidr = entry.parse::<Cidr>().map_err(|e| BadLine {
            path: path.into(),
            line: n + 1,
            text: entry.into(),
            why: e.to_string(),
        })?;
        sources.push(cidr);
    }
    Ok(sources)
}

/// A deny file's sources, or why they cannot be read (said in the file's terms).
pub fn read_deny_file(path: &Path) -> Result<Vec<Cidr>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_deny_file(&text, &path.display().to_string()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_files_take_addresses_prefixes_and_comments_and_refuse_the_rest() {
        let text = "# bad actors\n192.0.2.7\n\n198.51.100.0/24  # a whole net\n2001:db8::/32\n";
        let sources = parse_deny_file(text, "deny.txt").unwrap();
        let shown: Vec<String> = sources.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["192.0.2.7/32", "198.51.100.0/24", "2001:db8::/32"]);
        let bad = parse_deny_file("192.0.2.7\nexample.com\n", "deny.txt").unwrap_err();
        assert_eq!((bad.line, bad.text.as_str()), (2, "example.com"));
        assert!(bad.to_string().starts_with("deny.txt:2: `example.com`"), "{bad}");
    }
}
