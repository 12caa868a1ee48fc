//! Properties of the shared parser, on frames no one wrote by hand (no root needed):
//!
//! - arbitrary bytes, in either framing, never make it read outside a window it checked (in
//!   the kernel the verifier would have refused such a read; here a slice index panics);
//! - on every frame the recipe in `frames` can build (any VLAN stack, IPv4 options and
//!   fragments, extension-header chains, ICMP echoes and errors, both framings, cuts), the
//!   parser reads exactly what the recipe says the frame is ([`Frame::packet`],
//!   [`Frame::parse_failure`]);
//! - a bare IP packet reads the same through the IP framing as behind an Ethernet header.
//!
//! The verdict tier holds the kernel to the same parser on random and mutated frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use guard_common::parse::{Framing, MAX_V6_EXTENSIONS, MAX_VLAN_TAGS, parse};
use guard_userspace::kernel::frames::{Ext, Frame, Transport};
use proptest::prelude::*;

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![Just(Framing::Ethernet), Just(Framing::Ip)]
}

fn address(v6: bool) -> BoxedStrategy<IpAddr> {
    if v6 {
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))).boxed()
    } else {
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))).boxed()
    }
}

fn transport() -> impl Strategy<Value = Transport> {
    prop_oneof![
        any::<u16>().prop_map(Transport::Tcp),
        any::<u16>().prop_map(Transport::Udp),
        any::<u16>().prop_map(Transport::Sctp),
        Just(Transport::Icmp),
        Just(Transport::Esp),
        (any::<bool>(), any::<u16>()).prop_map(|(reply, id)| Transport::Echo { reply, id }),
    ]
}

fn extension() -> impl Strategy<Value = Ext> {
    prop_oneof![
        Just(Ext::HopByHop),
        Just(Ext::Routing),
        Just(Ext::DestOpts),
        (0u16..4).prop_map(|offset| Ext::Fragment { offset }),
    ]
}

/// A frame without an ICMP error in it.
fn plain_frame(v6: bool) -> impl Strategy<Value = Frame> {
    let shape = (
        proptest::collection::vec(any::<u16>(), 0..MAX_VLAN_TAGS + 4),
        0usize..11,
        prop_oneof![Just(0u16), 1u16..400],
        any::<bool>(),
        proptest::collection::vec(extension(), 0..MAX_V6_EXTENSIONS + 3),
        framing(),
    );
    (address(v6), address(v6), transport(), any::<u16>(), any::<u8>(), shape).prop_map(
        move |(src, dst, transport, sport, flags, (vlans, options, offset, mf, exts, framing))| {
            let mut f = Frame::new(&src.to_string(), &dst.to_string(), transport).sport(sport);
            f.tcp_flags = flags;
            f.vlans = vlans;
            f.framing = framing;
            if v6 {
                f.v6_extensions = exts;
            } else {
                f.ip_options = 4 * options;
                f.frag_offset = offset;
                f.more_fragments = mf;
            }
            f
        },
    )
}

/// Any frame the recipe builds: plain, or an ICMP error quoting a plain one from the address
/// it is sent to; maybe from an IPv4-mapped source; a plain one maybe cut short.
fn frame() -> impl Strategy<Value = Frame> {
    any::<bool>()
        .prop_flat_map(|v6| {
            (plain_frame(v6), plain_frame(v6), any::<bool>(), any::<bool>(), address(false))
        })
        .prop_flat_map(|(mut outer, mut quoted, is_error, mapped, v4_source)| {
            if is_error {
                quoted.framing = Framing::Ethernet;
                quoted.vlans.clear();
                quoted.src = outer.dst;
                outer.transport = Transport::IcmpError(Box::new(quoted));
                outer.frag_offset = 0;
                outer.v6_extensions.clear();
            }
            if mapped && outer.dst.is_ipv6() {
                outer.src = v4_source;
            }
            let whole = outer.bytes().len();
            let cut = if is_error {
                Just(None).boxed()
            } else {
                proptest::option::of(14..=whole).boxed()
            };
            (Just(outer), cut)
        })
        .prop_map(|(mut frame, cut)| {
            frame.truncate = cut;
            frame
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_read_only_inside_checked_windows(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        framing in framing(),
    ) {
        let _ = parse(&bytes.as_slice(), framing);
    }

    #[test]
    fn the_parser_reads_what_the_recipe_built(frame in frame()) {
        let bytes = frame.bytes();
        let expected = match frame.parse_failure() {
            Some(reason) => Err(reason),
            None => Ok(frame.packet()),
        };
        prop_assert_eq!(parse(&bytes.as_slice(), frame.framing), expected, "{:?}", frame);
    }

    #[test]
    fn an_ip_packet_reads_the_same_with_or_without_ethernet(frame in plain_frame(false)) {
        let ethernet = Frame { framing: Framing::Ethernet, vlans: vec![], truncate: None, ..frame };
        let ip = Frame { framing: Framing::Ip, ..ethernet.clone() };
        prop_assert_eq!(
            parse(&ethernet.bytes().as_slice(), Framing::Ethernet),
            parse(&ip.bytes().as_slice(), Framing::Ip)
        );
    }
}

/// A port-less packet keeps its protocol (drop events name it: `icmp`, not `proto-0`).
#[test]
fn an_icmp_error_about_someone_else_s_flow_is_port_less_icmp() {
    use guard_common::decision::{L4, L4Kind};
    let quoted = Frame::new("192.0.2.9", "198.51.100.1", Transport::Udp(53));
    for (src, dst) in [("198.51.100.1", "203.0.113.5"), ("2001:db8::1", "2001:db8::5")] {
        let mut q = quoted.clone();
        if dst.contains(':') {
            q = Frame::new("2001:db8::9", "2001:db8::1", Transport::Udp(53));
        }
        let frame = Frame::new(src, dst, Transport::IcmpError(Box::new(q)));
        let packet = parse(&frame.bytes().as_slice(), frame.framing).unwrap();
        let icmp = if dst.contains(':') { 58 } else { 1 };
        assert_eq!(packet.l4, L4::no_ports(icmp));
        assert_eq!((packet.l4.kind, packet.l4.proto), (L4Kind::NoPorts, icmp));
        assert_eq!(frame.packet(), packet, "the recipe agrees");
    }
}
