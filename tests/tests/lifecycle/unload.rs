//! Unload, guard's own clsact slot, links that vanish and come back.

use super::*;

/// `guard unload` after the agent stopped leaves nothing: none of the programs, maps or
/// links the agent created is left in the kernel (bpftool), no XDP program and no clsact
/// qdisc on the uplink or the Docker bridge (iproute2), no TCX link (bpftool's link list;
/// this bpftool predates `net show` listing TCX), no pins. A second unload says there is
/// nothing to unload and succeeds. The outside host then reaches the container again, as
/// before guard. While the agent runs, a second agent and an unload on its pins are refused.
#[test]
fn unload_leaves_nothing_and_a_second_unload_is_a_no_op() {
    let bed = AppBed::start("unload", 10, 20, &[], &[80]);
    let (a, app) = (&bed.a, &bed.app);
    let ip = app.ip;
    let bridge = boot::bridge_of(&app.net);

    let before = GuardObjects::list();
    let (mut agent, agent_metrics) = Agent::start_with_metrics(&[a.host_end()], &[]);
    let pin_dir = agent.pin_dir().to_owned();
    let mine = agent_objects(&before);
    println!("the agent's kernel objects: {mine:?}");
    assert!(
        mine.progs.len() >= 4 && mine.maps.len() >= 15 && mine.links.len() >= 4,
        "fewer kernel objects than expected: {mine:?}"
    );
    check(a, "agent running", &[expect("closed", sock(ip, 80), false)]);

    // One agent per pin directory: a second `guard run` is refused, and so is an unload
    // under the running agent; both leave its protection as it was.
    let guard = tests::agent::guard_bin();
    let guard = guard.to_string_lossy();
    let dir = pin_dir.to_string_lossy();
    let metrics = SocketAddr::from(([127, 0, 0, 1], observe::free_local_port())).to_string();
    let second_agent = try_run(
        &guard,
        &["run", "--pin-dir", &dir, "--iface", a.host_end(), "--metrics-addr", &metrics],
    );
    let refused = second_agent.expect_err("a second agent on the same pins must be refused");
    assert!(refused.contains("another guard agent is running"), "{refused}");
    let early = try_run(&guard, &["unload", "--pin-dir", &dir]);
    let refused = early.expect_err("unload under a running agent must be refused");
    assert!(refused.contains("an agent is running") && refused.contains("--force"), "{refused}");
    assert!(pin_dir.exists(), "the refused unload removed pins");
    check(a, "after the refused unload", &[expect("closed", sock(ip, 80), false)]);

    // Forced under the running agent: protection is lost until the agent notices (the XDP
    // detach wakes it), says so loudly, counts it and restores every pin and link.
    let forced = run(&guard, &["unload", "--pin-dir", &dir, "--force"]);
    assert!(forced.contains("unloaded"), "unexpected output of guard unload --force: {forced}");
    let restored = poll(Duration::from_secs(10), || {
        agent.log().contains("protection restored") && xdp_attached(a.host_end())
    });
    let log = agent.log();
    let lost = lines_with(&log, &["ERROR", "removed under the running agent"]);
    println!("after the forced unload:\n{}", lost.join("\n"));
    assert!(
        restored.is_some() && !lost.is_empty(),
        "the agent did not notice and restore a forced unload:\n{log}"
    );
    println!("protection restored {restored:.2?} after the forced unload");
    check(a, "after the forced unload", &[expect("closed", sock(ip, 80), false)]);
    let text = observe::http_get(agent_metrics, "/metrics").expect("metrics");
    assert_eq!(observe::metric(&text, "guard_protection_lost_total"), Some(1.0));
    assert!(observe::http_get(agent_metrics, "/readyz").is_ok(), "not ready once restored");
    // What the agent owns now, for the leak check below: its restored pins and links.
    let mine = agent_objects(&before);
    agent.terminate();

    let first = run(&guard, &["unload", "--pin-dir", &dir]);
    println!("first unload: {}", first.trim());
    assert!(first.contains("unloaded"), "unexpected output of guard unload: {first}");
    assert!(!pin_dir.exists(), "{dir} survived guard unload");
    let left = poll(Duration::from_secs(5), || mine.still_in(&GuardObjects::all()).is_empty());
    assert!(
        left.is_some(),
        "kernel objects of the agent left after unload: {:?}",
        mine.still_in(&GuardObjects::all())
    );
    for iface in [a.host_end(), bridge.as_str()] {
        let (xdp, qdiscs) = observe::iface_hooks(iface);
        assert!(!xdp, "an XDP program is still on {iface}");
        assert!(qdiscs.is_empty(), "{iface} still has {qdiscs:?} qdiscs");
    }
    let net_show = observe::bpftool(&["net", "show"]).to_string();
    for iface in [a.host_end(), bridge.as_str()] {
        assert!(
            !net_show.contains(&format!("\"{iface}\"")),
            "bpftool net show still lists {iface}: {net_show}"
        );
    }

    let second = try_run(&guard, &["unload", "--pin-dir", &dir]);
    let second = second.unwrap_or_else(|e| panic!("the second unload failed: {e}"));
    println!("second unload: {}", second.trim());
    assert!(second.contains("nothing to unload"), "the second unload did not say so: {second}");
    check(
        a,
        "after unload (as before guard)",
        &[expect("closed, now unguarded", sock(ip, 80), true)],
    );
    drop(agent);
}

/// On kernels without TCX (forced here) guard's TC programs are clsact filters in a slot of
/// its own (priority 1, handle 0x6764), which another tool's filters on the same qdisc share
/// with it: `guard status` names the mechanism of each hook; a filter someone deletes comes
/// back within a few passes; `guard unload` removes guard's filters, and the clsact qdisc
/// where nothing else is left, but another tool's filter and the qdisc it needs stay.
#[test]
fn clsact_filters_are_guards_own_slot_restored_and_unloaded_alone() {
    let bed = AppBed::start("clsact", 44, 44, &[], &[80]);
    let (a, app) = (&bed.a, &bed.app);
    let ip = app.ip;
    let bridge = boot::bridge_of(&app.net);
    require_exposure(a, &[sock(ip, 80)]);
    // Another tool's filter behind guard's on the uplink: classic BPF, "continue".
    let other = ["filter", "add", "dev", a.host_end(), "egress", "pref", "3", "bpf", "da"];
    run("tc", &["qdisc", "add", "dev", a.host_end(), "clsact"]);
    run("tc", &[&other[..], &["bytecode", "1,6 0 0 4294967295"]].concat());
    let (mut agent, _) = Agent::start_with_metrics(
        &[a.host_end()],
        &["--tc-attach", "netlink", "--resync-interval", "1"],
    );
    let closed = [expect("closed", sock(ip, 80), false)];
    check(a, "agent running", &closed);

    let status = run(
        &tests::agent::guard_bin().to_string_lossy(),
        &["status", "--pin-dir", &agent.pin_dir().to_string_lossy()],
    );
    println!("{status}");
    for (hook, iface) in
        [("tc-egress", a.host_end()), ("bridge-gate", &bridge), ("bridge-ingress", &bridge)]
    {
        let shown = status.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words == [hook, iface, "(netlink)"]
        });
        assert!(shown, "guard status does not show {hook} on {iface} as netlink:\n{status}");
    }

    // Deleted by hand: back in its slot within a few passes.
    run("tc", &["filter", "del", "dev", &bridge, "egress", "pref", "1", "handle", "0x6764", "bpf"]);
    let took = wait_until("the gate's filter restored", Duration::from_secs(10), || {
        observe::guard_filter(&bridge, "egress").is_some_and(|f| f.bpf_name == "guard_tc_gate")
    });
    println!("the deleted filter was back after {took:.1?}");
    check(a, "after the filter was deleted", &closed);
    let log = agent.log();
    let warned = lines_with(&log, &["WARN", "bridge-gate on", "filter deleted): re-attached"]);
    assert!(!warned.is_empty(), "no warning for the deleted filter:\n{log}");

    agent.terminate();
    agent.unload();
    for (iface, side) in
        [(a.host_end(), "egress"), (bridge.as_str(), "egress"), (&bridge, "ingress")]
    {
        assert_eq!(observe::guard_filter(iface, side), None, "guard's filter on {iface} {side}");
    }
    let others = observe::tc_filters(a.host_end(), "egress");
    assert!(
        others.len() == 1 && others[0].pref == 3,
        "the other tool's filter on {} did not survive unload alone: {others:?}",
        a.host_end()
    );
    let (_, qdiscs) = observe::iface_hooks(&bridge);
    assert!(qdiscs.is_empty(), "{bridge} keeps the clsact qdisc guard added: {qdiscs:?}");
    run("tc", &["qdisc", "del", "dev", a.host_end(), "clsact"]);
}

/// A link the agent pinned that someone removes (its pin) or detaches (`bpftool link detach`,
/// which keeps the pin) comes back within a few reconcile passes, and the port it closed is
/// closed again.
#[test]
fn vanished_links_are_re_attached() {
    let bed = AppBed::start("vanish", 41, 41, &[], &[80]);
    let (a, app) = (&bed.a, &bed.app);
    let ip = app.ip;
    require_exposure(a, &[sock(ip, 80)]);
    let (agent, _) = Agent::start_with_metrics(&[a.host_end()], &["--resync-interval", "1"]);
    let closed = [expect("closed", sock(ip, 80), false)];
    check(a, "agent running", &closed);

    let index = ifindex(a.host_end());
    let (xdp, tc) = (format!("xdp-{index}"), format!("tc-egress-{index}"));
    let links = agent.pin_dir().join("links");
    // One pin at a time, and absent is an answer: the agent replaces pins while we look.
    let link_id = |pin: &str| {
        let path = links.join(pin);
        let shown = try_run("bpftool", &["-j", "link", "show", "pinned", &path.to_string_lossy()]);
        let shown: serde_json::Value = serde_json::from_str(&shown.ok()?).ok()?;
        shown["id"].as_u64()
    };
    let back_as_new_link = |what: &str, pin: &str, old: u64| {
        let took =
            wait_until(format!("{pin} re-attached after {what}"), Duration::from_secs(10), || {
                links.join(pin).exists()
                    && link_id(pin).is_some_and(|id| id != old)
                    && xdp_attached(a.host_end())
            });
        println!("{pin}: re-attached {took:.1?} after {what}");
    };

    // Removing the pins drops the last reference: the links detach at once.
    let (old_xdp, old_tc) = (link_id(&xdp).unwrap(), link_id(&tc).unwrap());
    for pin in [&xdp, &tc] {
        std::fs::remove_file(links.join(pin))
            .unwrap_or_else(|e| panic!("rm {}: {e}", links.join(pin).display()));
    }
    back_as_new_link("its pin was removed", &xdp, old_xdp);
    back_as_new_link("its pin was removed", &tc, old_tc);
    check(a, "after the pins were removed", &closed);

    // A detached link keeps its pin but runs nowhere.
    let old_xdp = link_id(&xdp).unwrap();
    run("bpftool", &["link", "detach", "id", &old_xdp.to_string()]);
    back_as_new_link("bpftool link detach", &xdp, old_xdp);
    check(a, "after the link was detached", &closed);

    let log = agent.log();
    let warned = lines_with(
        &log,
        &["WARN", "vanished (pin removed, link detached or filter deleted): re-attached"],
    );
    assert!(warned.len() >= 3, "expected a warning per vanished link, got {warned:?}\n{log}");
    agent.unload();
}

/// The kernel objects that appeared since `before`, plus every map the new guard programs
/// use (aya's own maps such as `.rodata` included).
fn agent_objects(before: &GuardObjects) -> GuardObjects {
    let mut mine = GuardObjects::list().since(before);
    let progs = observe::bpftool(&["prog", "show"]);
    for prog in progs.as_array().into_iter().flatten() {
        if prog["id"].as_u64().is_some_and(|id| mine.progs.contains(&id)) {
            mine.maps.extend(
                prog["map_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_u64),
            );
        }
    }
    mine
}
