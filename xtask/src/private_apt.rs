//! apt-get and apt-cache with a sources list, package lists and cache of their own: how xtask
//! fetches packages from other Debian suites (kernels, engines) without touching the
//! machine's apt sources, lists or status.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{capture, sh, show};

pub struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    /// Everything under `dir`: `sources` (one-line format) as its sources list, its own package
    /// lists and download cache.
    pub fn new(dir: &Path, sources: &str) -> Result<Self> {
        let lists = dir.join("lists");
        let cache = dir.join("cache");
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(cache.join("archives/partial"))?;
        let sources_list = dir.join("sources.list");
        fs::write(&sources_list, sources)
            .with_context(|| format!("writing {}", sources_list.display()))?;
        let option = |key: &str, value: &Path| format!("{key}={}", value.display());
        let options = vec![
            option("Dir::Etc::sourcelist", &sources_list),
            "Dir::Etc::sourceparts=/nonexistent".to_owned(),
            option("Dir::State::Lists", &lists),
            option("Dir::Cache", &cache),
            // The download directory is root's; apt's unprivileged _apt user could not write it.
            "APT::Sandbox::User=root".to_owned(),
        ];
        Ok(Self { options })
    }

    /// `program` (apt-get, apt-cache) with this configuration.
    pub fn with_options(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for option in &self.options {
            cmd.arg("-o").arg(option);
        }
        cmd
    }

    /// apt-get, quiet and non-interactive.
    pub fn command(&self) -> Command {
        let mut cmd = self.with_options("apt-get");
        cmd.arg("-q").env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    pub fn update(&self) -> Result<()> {
        let mut cmd = self.command();
        cmd.arg("update");
        println!("xtask: {} ...", show(&cmd));
        sh(&mut cmd)
    }

    /// Every package name in the lists that starts with `prefix`.
    pub fn package_names(&self, prefix: &str) -> Result<Vec<String>> {
        let out = capture(self.with_options("apt-cache").args(["pkgnames", prefix]))?;
        Ok(out.lines().map(str::to_owned).collect())
    }
}
