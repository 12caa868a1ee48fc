//! `guard status`: every container, its ports, how they are published, and who outside may
//! reach each; plus whether the kernel's maps match that (they do while an agent runs).
//!
//! It works with or without a running agent: it reads Docker and, if present, the pins.

use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr};

use anyhow::Context as _;

use crate::{
    desired::{ContainerPolicy, desired_state},
    docker::DockerClient,
    identities::Identities,
    interfaces,
    maps::PolicyMaps,
    pins::{Hook, Pins},
    policy::{Opening, PortSpec, Proto, Sources},
    policy_file,
    tables::diff,
};

pub async fn status(pins: &Pins, config: &std::path::Path) -> anyhow::Result<String> {
    let policy = policy_file::load(config)?;
    let docker = DockerClient::connect().await?;
    let snapshot = docker.snapshot().await?;
    let host_addrs = interfaces::host_addresses().context("listing host addresses")?;
    let maps = if pins.exists() { Some(PolicyMaps::from_pins(pins)?) } else { None };
    let current = maps.as_ref().map(PolicyMaps::read).transpose()?;

    // Use the agent's target ids, so the comparison with the maps is meaningful.
    let mut ids = Identities::adopt(current.iter().flat_map(|t| t.identities.clone()));
    let targets = ids.assign(snapshot.containers.iter().map(|c| c.id.as_str()));
    let desired = desired_state(&snapshot, &host_addrs, &targets, &policy);

    let mut out = String::new();
    match &current {
        None => writeln!(
            out,
            "protection: NOT LOADED (no pins at {}); `guard run` starts it",
            pins.root().display()
        )?,
        Some(current) => {
            let links = pins.pinned_links()?;
            let names = interfaces::links().unwrap_or_default();
            let ifaces: Vec<String> = links
                .iter()
                .filter(|(hook, _, _)| *hook == Hook::Xdp)
                .map(|(_, ifindex, _)| {
                    names
                        .iter()
                        .find(|l| l.ifindex == *ifindex)
                        .map_or(format!("ifindex {ifindex} (gone)"), |l| l.name.clone())
                })
                .collect();
            writeln!(
                out,
                "protection: loaded at {} on {}",
                pins.root().display(),
                if ifaces.is_empty() { "no interface".into() } else { ifaces.join(", ") }
            )?;
            let pending = diff(current, &desired.tables).change_count();
            if pending == 0 {
                writeln!(out, "maps: in sync with Docker")?;
            } else {
                writeln!(
                    out,
                    "maps: {pending} entries differ from Docker's state (is `guard run` running?)"
                )?;
            }
        }
    }
    writeln!(out)?;
    out.push_str(&table(&desired.containers));
    writeln!(
        out,
        "\nlocal (the host) and bridge (other containers) may reach every port; OUTSIDE is everyone else."
    )?;
    for policy in &desired.containers {
        for error in &policy.label_errors {
            writeln!(
                out,
                "warning: container {}: {error}; ignored, its ports stay closed",
                policy.container.name
            )?;
        }
    }
    Ok(out)
}

/// One row per known port of each container, and one for all its other ports.
fn table(containers: &[ContainerPolicy]) -> String {
    let mut rows =
        vec![["CONTAINER", "ADDRESSES", "PORT", "PUBLISHED AS", "OUTSIDE"].map(String::from)];
    for policy in containers {
        let c = &policy.container;
        let mut ports: BTreeSet<(u16, Proto)> =
            c.published.iter().map(|p| (p.container_port, p.proto)).collect();
        for opening in &policy.openings {
            // Short ranges get a row per port; longer ones show in the rule column.
            if let PortSpec::Range { proto, first, last } = opening.ports
                && last - first < 16
            {
                ports.extend((first..=last).map(|p| (p, proto)));
            }
        }
        let addresses = c.addresses.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(" ");
        let mut first_row = true;
        let mut push = |port: String, published: String, outside: String| {
            let (name, addrs) = if first_row {
                (c.name.clone(), addresses.clone())
            } else {
                (String::new(), String::new())
            };
            first_row = false;
            rows.push([name, addrs, port, published, outside]);
        };
        for (port, proto) in ports {
            let published: Vec<String> = c
                .published
                .iter()
                .filter(|p| p.container_port == port && p.proto == proto)
                .map(|p| format!("{}:{}", p.host_ip, p.host_port))
                .collect();
            let covering = policy.openings.iter().filter(|o| covers(o, port, proto));
            push(
                format!("{port}/{proto}"),
                if published.is_empty() { "-".into() } else { published.join(" ") },
                who(covering),
            );
        }
        let all = policy.openings.iter().filter(|o| o.ports == PortSpec::All);
        push("other".into(), "-".into(), who(all));
    }
    render(&rows)
}

fn covers(opening: &Opening, port: u16, proto: Proto) -> bool {
    match opening.ports {
        PortSpec::All => true,
        PortSpec::Range { proto: p, first, last } => p == proto && (first..=last).contains(&port),
    }
}

/// "everyone", a source list, or "none", with the rules that said so.
fn who<'a>(openings: impl Iterator<Item = &'a Opening>) -> String {
    let openings: Vec<&Opening> = openings.collect();
    let rules = |os: &[&Opening]| {
        os.iter()
            .map(|o| o.rule.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let everyone: Vec<&Opening> =
        openings.iter().copied().filter(|o| o.sources == Sources::Everyone).collect();
    if !everyone.is_empty() {
        return format!("everyone ({})", rules(&everyone));
    }
    let sources: BTreeSet<String> = openings
        .iter()
        .flat_map(|o| match &o.sources {
            Sources::Listed(cidrs) => cidrs.iter().map(ToString::to_string).collect(),
            Sources::Everyone => Vec::new(),
        })
        .collect();
    if sources.is_empty() {
        "none".into()
    } else {
        format!("{} ({})", sources.into_iter().collect::<Vec<_>>().join(", "), rules(&openings))
    }
}

fn render(rows: &[[String; 5]]) -> String {
    let widths: Vec<usize> =
        (0..5).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> =
            row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
