//! The kernels the VM boots: Debian's builds, fetched once into a cache, or a vmlinuz given
//! by path.
//!
//! Debian's packages are fetched with apt-get under a private configuration (its own sources
//! list, package lists and cache, all under the cache directory): the machine's apt setup is
//! neither needed nor touched, a suite the machine does not use (bullseye-security for 5.10)
//! works the same way, and `apt-get download` verifies the package as any install would (the
//! Release file's signature against Debian's archive keyring, then the package's hash).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::private_apt::PrivateApt;
use crate::sh;

/// A Debian kernel series: which suite has it and how its unsigned generic image is named.
pub struct Series {
    spec: &'static str,
    suite: &'static str,
    /// Package names are `{prefix}{N}{suffix}`, N a number that grows with each build; the
    /// cloud and rt flavours do not match (their suffix differs).
    prefix: &'static str,
    suffix: &'static str,
}

/// Every series the archive still serves (no 5.15 or 6.6 in Debian). The generic flavour:
/// the cloud one has no 9p, which the VM's root file system needs.
const SERIES: &[Series] = &[
    Series {
        spec: "5.10",
        suite: "bullseye-security",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
    },
    Series {
        spec: "6.1",
        suite: "bookworm-security",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
    },
    Series {
        spec: "6.12",
        suite: "bookworm-security",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
];

/// The newest builds are sometimes listed before the mirror serves them: try this many,
/// newest first.
const DOWNLOAD_TRIES: usize = 3;

/// What `--kernel` named.
pub enum Spec {
    Debian(&'static Series),
    Image(PathBuf),
}

impl Spec {
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(series) = SERIES.iter().find(|s| s.spec == spec) {
            return Ok(Spec::Debian(series));
        }
        let path = PathBuf::from(spec);
        if path.is_file() {
            return Ok(Spec::Image(path));
        }
        let known: Vec<&str> = SERIES.iter().map(|s| s.spec).collect();
        bail!("--kernel {spec}: neither a kernel series ({}) nor a vmlinuz file", known.join(", "))
    }
}

/// A kernel ready to boot.
pub struct Kernel {
    /// The image; virtme-ng finds the modules in `../lib/modules/RELEASE` beside it.
    pub vmlinuz: PathBuf,
    /// `uname -r` as far as the host can tell (the file name's tail), for messages.
    pub release: String,
}

/// The kernel `spec` names, downloaded and unpacked first when it is not in the cache.
pub fn get(spec: &Spec) -> Result<Kernel> {
    match spec {
        Spec::Image(path) => {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let release = name
                .as_deref()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .unwrap_or("(release unknown until it boots)")
                .to_owned();
            Ok(Kernel { vmlinuz: path.clone(), release })
        }
        Spec::Debian(series) => debian(series),
    }
}

/// `$XDG_CACHE_HOME/container-guard/kernels`, else `~/.cache/container-guard/kernels`.
fn cache_root() -> PathBuf {
    crate::cache_home().join("kernels")
}

/// `<cache>/<spec>/current` names the unpacked package `<cache>/<spec>/<package>/`.
fn debian(series: &Series) -> Result<Kernel> {
    let dir = cache_root().join(series.spec);
    if let Some(kernel) = cached(&dir)? {
        println!("xtask: kernel {} ({}) cached in {}", series.spec, kernel.release, dir.display());
        return Ok(kernel);
    }
    println!("xtask: kernel {} not cached: fetching it from {} ...", series.spec, series.suite);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let line = format!(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} {} main\n",
        security_mirror(),
        series.suite
    );
    let apt = PrivateApt::new(&cache_root().join("apt").join(series.suite), &line)?;
    apt.update()?;
    let (package, deb) = download_newest(&apt, series, &dir)?;
    let unpacked = unpack(&deb, &dir.join(&package));
    let _ = fs::remove_file(&deb);
    unpacked?;
    fs::write(dir.join("current"), &package)?;
    cached(&dir)?
        .with_context(|| format!("{package} unpacked into {} has no vmlinuz", dir.display()))
}

fn cached(dir: &Path) -> Result<Option<Kernel>> {
    let Ok(package) = fs::read_to_string(dir.join("current")) else {
        return Ok(None);
    };
    let root = dir.join(package.trim());
    let Some((vmlinuz, release)) = find_vmlinuz(&root)? else {
        return Ok(None);
    };
    let ready = root.join("lib/modules").join(&release).join("modules.dep").is_file();
    Ok(ready.then_some(Kernel { vmlinuz, release }))
}

/// `root/boot/vmlinuz-RELEASE`
fn find_vmlinuz(root: &Path) -> Result<Option<(PathBuf, String)>> {
    let Ok(entries) = fs::read_dir(root.join("boot")) else {
        return Ok(None);
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            return Ok(Some((entry.path(), release.to_owned())));
        }
    }
    Ok(None)
}

/// Tries the newest builds first; returns the package name and its .deb.
fn download_newest(apt: &PrivateApt, series: &Series, dir: &Path) -> Result<(String, PathBuf)> {
    let listed = apt.package_names(series.prefix)?;
    let candidates = newest_first(series, &listed);
    if candidates.is_empty() {
        bail!("{} lists no {}N{} package", series.suite, series.prefix, series.suffix);
    }
    let download_dir = dir.join("download");
    let _ = fs::remove_dir_all(&download_dir);
    fs::create_dir_all(&download_dir)?;
    for package in candidates.iter().take(DOWNLOAD_TRIES) {
        println!(
            "xtask: downloading {package} with apt-get download (signature and hash checked) ..."
        );
        if let Err(e) = sh(apt.command().arg("download").arg(package).current_dir(&download_dir)) {
            println!("xtask: {e:#}; trying the build before it");
            continue;
        }
        let deb = fs::read_dir(&download_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| {
                format!("apt-get download left no .deb in {}", download_dir.display())
            })?;
        let kept = dir.join(deb.file_name().context("no file name")?);
        fs::rename(&deb, &kept)?;
        let _ = fs::remove_dir_all(&download_dir);
        return Ok((package.clone(), kept));
    }
    let _ = fs::remove_dir_all(&download_dir);
    bail!("none of the {DOWNLOAD_TRIES} newest {} builds downloaded", series.spec)
}

/// The series' packages among `names`, newest (highest build number) first.
fn newest_first(series: &Series, names: &[String]) -> Vec<String> {
    let mut builds: Vec<(u64, &String)> = names
        .iter()
        .filter_map(|name| {
            let middle = name.strip_prefix(series.prefix)?.strip_suffix(series.suffix)?;
            Some((middle.parse().ok()?, name))
        })
        .collect();
    builds.sort_by_key(|b| std::cmp::Reverse(b.0));
    builds.into_iter().map(|(_, name)| name.clone()).collect()
}

/// `dpkg-deb -x` into a scratch directory renamed into place at the end, so that an
/// interrupted unpack is never taken for a kernel; then `depmod`, which virtme-ng and the
/// guest's modprobe need (the package leaves modules.dep to its postinst).
fn unpack(deb: &Path, dest: &Path) -> Result<()> {
    let scratch = dest.with_extension("partial");
    let _ = fs::remove_dir_all(&scratch);
    let _ = fs::remove_dir_all(dest);
    println!("xtask: unpacking {} with dpkg-deb -x ...", deb.display());
    let result = (|| {
        sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&scratch))?;
        let (_, release) = find_vmlinuz(&scratch)?
            .with_context(|| format!("{} has no boot/vmlinuz-*", deb.display()))?;
        println!("xtask: indexing the modules of {release} with depmod ...");
        sh(Command::new("depmod").arg("-a").arg("-b").arg(&scratch).arg(&release))?;
        fs::rename(&scratch, dest).with_context(|| format!("renaming to {}", dest.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&scratch);
    }
    result
}

/// The machine's mirror of Debian's security archive (one-line or deb822 sources), else
/// Debian's own.
fn security_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    files
        .iter()
        .filter_map(|file| fs::read_to_string(file).ok())
        .find_map(|text| find_security_uri(&text))
        .unwrap_or_else(|| "http://deb.debian.org/debian-security".to_owned())
}

fn find_security_uri(sources: &str) -> Option<String> {
    sources
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .find(|word| {
            (word.starts_with("http://") || word.starts_with("https://"))
                && word.trim_end_matches('/').ends_with("/debian-security")
        })
        .map(|uri| uri.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(spec: &str) -> &'static Series {
        SERIES.iter().find(|s| s.spec == spec).unwrap()
    }

    #[test]
    fn newest_generic_build_first() {
        let names: Vec<String> = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0-57-rt-amd64-unsigned",
            "linux-image-6.1.0-10-amd64-unsigned",
            "linux-image-6.12.118+deb12-amd64-unsigned",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            newest_first(series("6.1"), &names),
            [
                "linux-image-6.1.0-57-amd64-unsigned",
                "linux-image-6.1.0-10-amd64-unsigned",
                "linux-image-6.1.0-9-amd64-unsigned"
            ]
        );
        assert_eq!(
            newest_first(series("6.12"), &names),
            ["linux-image-6.12.118+deb12-amd64-unsigned"]
        );
    }

    #[test]
    fn security_mirror_from_either_sources_format() {
        let deb822 = "Types: deb\n# http://snapshot.debian.org/archive/debian-security/x\n\
                      URIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            find_security_uri(deb822).as_deref(),
            Some("http://deb.debian.org/debian-security")
        );
        let one_line = "deb http://deb.debian.org/debian bookworm main\n\
                        deb http://mirror.example/debian-security/ bookworm-security main\n";
        assert_eq!(
            find_security_uri(one_line).as_deref(),
            Some("http://mirror.example/debian-security")
        );
        assert_eq!(find_security_uri("deb http://deb.debian.org/debian bookworm main\n"), None);
    }
}
