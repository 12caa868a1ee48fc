//! The lines the guest prints so that the host can tell what happened inside the VM.
//!
//! The VM's only channel back is its serial console, and virtme-ng's exit status is always
//! 255 here (no udevd, no script exit code), so the guest brackets each step with a marker
//! line and the host reads pass/fail from them and from the libtest `test result:` lines in
//! between. A marker that never arrives is a step that never finished: never a pass.

use clap::ValueEnum;

use crate::test::Tier;

/// Starts every marker line; unlikely in any test's or kernel's output.
const PREFIX: &str = "@@guard-vm@@ ";

#[derive(Debug, PartialEq)]
pub enum Marker {
    /// The guest runs; `release` is its `uname -r`.
    Start {
        release: String,
    },
    /// dockerd answers inside the guest.
    DockerdReady,
    TierStart(Tier),
    /// A tier's test binary exited: its exit code, `None` when a signal killed it.
    TierEnd {
        tier: Tier,
        code: Option<i32>,
    },
    /// The guest's own preparation failed; no (further) tier runs.
    Failed(String),
    /// The guest is done; the VM powers off next.
    End,
}

impl Marker {
    /// The line the guest prints.
    pub fn line(&self) -> String {
        let body = match self {
            Marker::Start { release } => format!("start {release}"),
            Marker::DockerdReady => "dockerd-ready".to_owned(),
            Marker::TierStart(tier) => format!("tier-start {}", tier.name()),
            Marker::TierEnd { tier, code: Some(code) } => {
                format!("tier-end {} {code}", tier.name())
            }
            Marker::TierEnd { tier, code: None } => format!("tier-end {} signal", tier.name()),
            // One line: a multi-line error would lose its tail.
            Marker::Failed(why) => format!("failed {}", why.replace('\n', " ")),
            Marker::End => "end".to_owned(),
        };
        format!("{PREFIX}{body}")
    }

    /// Prints the marker on a line of its own.
    pub fn print(&self) {
        println!("{}", self.line());
    }

    /// The marker on this console line, if it is one (a serial console ends lines with
    /// `\r\n`, and kernel messages may precede it on the same line).
    pub fn parse(line: &str) -> Option<Self> {
        let (_, rest) = line.trim_end().split_once(PREFIX)?;
        let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        let tier = |name: &str| Tier::from_str(name, false).ok();
        Some(match word {
            "start" => Marker::Start { release: arg.to_owned() },
            "dockerd-ready" => Marker::DockerdReady,
            "tier-start" => Marker::TierStart(tier(arg)?),
            "tier-end" => {
                let (name, code) = arg.split_once(' ')?;
                Marker::TierEnd { tier: tier(name)?, code: code.parse().ok() }
            }
            "failed" => Marker::Failed(arg.to_owned()),
            "end" => Marker::End,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_marker_reads_back_as_printed() {
        let markers = [
            Marker::Start { release: "6.12.118+deb12-amd64".to_owned() },
            Marker::DockerdReady,
            Marker::TierStart(Tier::Verdict),
            Marker::TierEnd { tier: Tier::E2e, code: Some(101) },
            Marker::TierEnd { tier: Tier::Verdict, code: None },
            Marker::Failed("dockerd did not answer".to_owned()),
            Marker::End,
        ];
        for marker in markers {
            assert_eq!(Marker::parse(&format!("{}\r\n", marker.line())), Some(marker));
        }
    }

    #[test]
    fn other_lines_are_no_markers() {
        assert_eq!(Marker::parse("test result: ok. 3 passed; 0 failed"), None);
        assert_eq!(Marker::parse("@@guard-vm@@ tier-start nonsense"), None);
    }

    #[test]
    fn a_kernel_message_before_a_marker_does_not_hide_it() {
        let line = format!("[   12.5] veth0: entered promiscuous mode{}", Marker::End.line());
        assert_eq!(Marker::parse(&line), Some(Marker::End));
    }
}
