use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use super::*;

/// Answers of CrowdSec 1.4.6's LAPI (Debian 12), captured with curl after `cscli decisions
/// add -i 192.0.2.7 -d 1h`, `-r 198.51.100.0/24 -d 30m`, `-i 2001:db8::5 -d 2h -t captcha`,
/// then `cscli decisions delete -i 192.0.2.7`.
const EMPTY: &str = r#"{"deleted":null,"new":null}"#;
const ADDED: &str = r#"{"deleted":null,"new":[{"duration":"29m59.579078952s","id":2,"origin":"cscli","scenario":"manual 'ban' from 'tester'","scope":"Range","type":"ban","value":"198.51.100.0/24"},{"duration":"59m58.579077436s","id":1,"origin":"cscli","scenario":"manual 'ban' from 'tester'","scope":"Ip","type":"ban","value":"192.0.2.7"},{"duration":"1h59m59.579076915s","id":3,"origin":"cscli","scenario":"manual 'captcha' from 'tester'","scope":"Ip","type":"captcha","value":"2001:db8::5"}]}"#;
const DELETED: &str = r#"{"deleted":[{"duration":"-14.186325ms","id":1,"origin":"cscli","scenario":"manual 'ban' from 'tester'","scope":"Ip","type":"ban","value":"192.0.2.7"}],"new":null}"#;

const NOW: f64 = 1_000_000.25;

fn cidr(text: &str) -> Cidr {
    text.parse().unwrap()
}

fn held_after(answers: &[(&str, bool)]) -> Bans {
    let mut held = Held::default();
    for (body, startup) in answers {
        held.apply(StreamAnswer::parse(body.as_bytes()).unwrap(), *startup, NOW);
    }
    held.bans(NOW as u64)
}

#[test]
fn go_durations_parse_to_seconds() {
    let close = |text: &str, want: f64| {
        let got = parse_go_duration(text).unwrap_or_else(|| panic!("{text:?} did not parse"));
        assert!((got - want).abs() < 1e-6, "{text:?}: {got} != {want}");
    };
    close("3h59m57.6s", 3.0 * 3600.0 + 59.0 * 60.0 + 57.6);
    close("29m59.579078952s", 29.0 * 60.0 + 59.579_078_952);
    close("-14.186325ms", -0.014_186_325);
    close("1h59m59.579076915s", 7_199.579_076_915);
    close("167h", 167.0 * 3600.0);
    close("0s", 0.0);
    close("0", 0.0);
    close("1.5h", 5400.0);
    close("2µs", 2e-6);
    close("2us", 2e-6);
    close("3ns", 3e-9);
    close("+4m", 240.0);
    for bad in ["", "-", "h", "5", "1x", "--1s", "1h 2m", ".s", "1..5s", "1hh"] {
        assert_eq!(parse_go_duration(bad), None, "{bad:?}");
    }
}

#[test]
fn only_bans_of_addresses_and_ranges_are_kept() {
    let bans = held_after(&[(ADDED, true)]);
    assert_eq!(
        bans,
        Bans::from([
            // 59m58.58s from NOW, rounded up: never before the LAPI's own end.
            (cidr("192.0.2.7"), Some(1_000_000 + 3599)),
            (cidr("198.51.100.0/24"), Some(1_000_000 + 1800)),
        ]),
        "the captcha on 2001:db8::5 is not a ban"
    );
    let other = r#"{"new":[
        {"id":7,"scope":"Country","type":"ban","value":"FR","duration":"1h"},
        {"id":8,"scope":"AS","type":"ban","value":"64496","duration":"1h"},
        {"id":9,"scope":"ip","type":"BAN","value":"2001:db8::9","duration":"1h"},
        {"id":10,"scope":"Ip","type":"ban","value":"::ffff:192.0.2.10","duration":"1h"},
        {"id":11,"scope":"Ip","type":"ban","value":"not an address","duration":"1h"},
        {"id":12,"scope":"Ip","type":"ban","value":"192.0.2.12","duration":"1h","simulated":true}
    ],"deleted":[]}"#;
    assert_eq!(
        held_after(&[(other, true)]).into_keys().collect::<Vec<_>>(),
        [cidr("192.0.2.10"), cidr("2001:db8::9")],
        "scope and type in any case; an IPv4-mapped address is the IPv4 one; simulated and \
         unparseable decisions change nothing"
    );
}

#[test]
fn deleted_decisions_end_their_bans() {
    let bans = held_after(&[(EMPTY, true), (ADDED, false), (DELETED, false)]);
    assert_eq!(bans.into_keys().collect::<Vec<_>>(), [cidr("198.51.100.0/24")]);
}

#[test]
fn null_and_missing_lists_change_nothing() {
    for quiet in [EMPTY, "{}", r#"{"new":[],"deleted":[]}"#] {
        let bans = held_after(&[(ADDED, true), (quiet, false)]);
        assert_eq!(bans.len(), 2, "{quiet}");
    }
    assert!(StreamAnswer::parse(b"<html>bad gateway</html>").is_err());
}

#[test]
fn a_startup_answer_replaces_what_was_held() {
    let restarted = r#"{"new":[{"id":40,"scope":"Ip","type":"ban","value":"203.0.113.4","duration":"4h"}],"deleted":null}"#;
    let bans = held_after(&[(ADDED, true), (restarted, true)]);
    assert_eq!(bans.into_keys().collect::<Vec<_>>(), [cidr("203.0.113.4")]);
}

#[test]
fn a_source_stays_banned_while_any_of_its_decisions_holds() {
    let two = r#"{"new":[
        {"id":1,"scope":"Ip","type":"ban","value":"192.0.2.7","duration":"1h"},
        {"id":2,"scope":"Ip","type":"ban","value":"192.0.2.7","duration":"3h"}
    ]}"#;
    let bans = held_after(&[(two, true)]);
    assert_eq!(bans[&cidr("192.0.2.7")], Some(1_000_001 + 3 * 3600), "the later end");
    let first_gone =
        r#"{"deleted":[{"id":1,"scope":"Ip","type":"ban","value":"192.0.2.7","duration":"-1s"}]}"#;
    let bans = held_after(&[(two, true), (first_gone, false)]);
    assert!(bans.contains_key(&cidr("192.0.2.7")), "decision 2 still bans it");
    // A decision in both lists of one answer (made and replaced between two polls) stays.
    let both = r#"{"deleted":[{"id":5,"scope":"Ip","type":"ban","value":"192.0.2.5","duration":"-1s"}],
                   "new":[{"id":5,"scope":"Ip","type":"ban","value":"192.0.2.5","duration":"1h"}]}"#;
    assert!(held_after(&[(both, false)]).contains_key(&cidr("192.0.2.5")));
}

#[test]
fn expiries_come_from_durations_and_pass_on_time() {
    let mixed = r#"{"new":[
        {"id":1,"scope":"Ip","type":"ban","value":"192.0.2.1","duration":"-3s"},
        {"id":2,"scope":"Ip","type":"ban","value":"192.0.2.2"},
        {"id":3,"scope":"Ip","type":"ban","value":"192.0.2.3","duration":"forever"},
        {"id":4,"scope":"Ip","type":"ban","value":"192.0.2.4","duration":"10s"}
    ]}"#;
    let mut held = Held::default();
    held.apply(StreamAnswer::parse(mixed.as_bytes()).unwrap(), true, NOW);
    assert_eq!(
        held.bans(NOW as u64),
        Bans::from([
            // No duration, or one that does not parse: banned until deleted (fail closed).
            (cidr("192.0.2.2"), None),
            (cidr("192.0.2.3"), None),
            (cidr("192.0.2.4"), Some(1_000_011)),
        ]),
        "an already expired decision bans nothing"
    );
    assert!(!held.bans(1_000_011).contains_key(&cidr("192.0.2.4")));
}

#[test]
fn key_files_are_trimmed_and_must_hold_a_key() {
    let dir = std::env::temp_dir().join(format!("guard-crowdsec-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("key");
    std::fs::write(&file, "  1c0eb7700098a415a96946b6ffab50a4\n").unwrap();
    assert_eq!(read_key_file(&file).unwrap(), "1c0eb7700098a415a96946b6ffab50a4");
    std::fs::write(&file, " \n").unwrap();
    assert!(read_key_file(&file).unwrap_err().to_string().contains("is empty"));
    let missing = dir.join("missing");
    assert!(read_key_file(&missing).unwrap_err().to_string().contains("missing"));
    std::fs::write(&file, "k\n").unwrap();
    let poll = Duration::from_secs(1);
    assert_eq!(CrowdSec::from_flags("http://127.0.0.1:8080", &file, poll).unwrap().key, "k");
    assert!(CrowdSec::from_flags("127.0.0.1:8080", &file, poll).is_err(), "no scheme");
    let err = CrowdSec::from_flags("http://127.0.0.1:8080", &missing, poll).unwrap_err();
    assert!(format!("{err:#}").contains("--crowdsec-key-file"), "{err:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scripted LAPI on loopback: answers each request with the next body of `script` (then
/// with an empty stream) and records each request's head.
struct FakeLapi {
    task: tokio::task::JoinHandle<()>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeLapi {
    async fn start(port: u16, script: &[&str]) -> (Self, u16) {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Mutex<Vec<String>>> =
            Arc::new(Mutex::new(script.iter().rev().map(ToString::to_string).collect()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap() == 1 {
                    head.push(byte[0]);
                }
                recorded.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                let body = script.lock().unwrap().pop().unwrap_or_else(|| EMPTY.to_owned());
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        (FakeLapi { task, requests }, port)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn stop(self) {
        self.task.abort();
    }
}

async fn until(receiver: &mut watch::Receiver<Bans>, what: &str, check: impl Fn(&Bans) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(10), receiver.wait_for(|b| check(b)));
    assert!(waited.await.is_ok(), "no {what} within 10 s: {:?}", *receiver.borrow());
}

#[tokio::test(flavor = "current_thread")]
async fn an_lapi_outage_keeps_the_bans_and_the_stream_starts_over() {
    let (lapi, port) = FakeLapi::start(0, &[ADDED]).await;
    let (sender, mut receiver) = watch::channel(Bans::new());
    let config = CrowdSec {
        url: format!("http://127.0.0.1:{port}/"),
        key: "secret-key".into(),
        poll: Duration::from_millis(100),
    };
    let follower = tokio::spawn(follow(config, sender));
    until(&mut receiver, "bans from the first answer", |b| b.len() == 2).await;
    let first = lapi.requests();
    assert!(first[0].starts_with("GET /v1/decisions/stream?startup=true"), "{}", first[0]);
    assert!(first[0].to_ascii_lowercase().contains("x-api-key: secret-key"), "{}", first[0]);
    let polled = tokio::time::timeout(Duration::from_secs(5), async {
        while lapi.requests().len() < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(polled.await.is_ok(), "no polls after the first");
    assert!(lapi.requests()[1].starts_with("GET /v1/decisions/stream?startup=false"));

    lapi.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.borrow().len(), 2, "an LAPI that is down lifts no ban");

    let restarted =
        r#"{"new":[{"id":1,"scope":"Ip","type":"ban","value":"203.0.113.4","duration":"4h"}]}"#;
    let (lapi, _) = FakeLapi::start(port, &[restarted]).await;
    until(&mut receiver, "the restarted LAPI's bans", |b| b.keys().eq([&cidr("203.0.113.4")]))
        .await;
    assert!(
        lapi.requests()[0].starts_with("GET /v1/decisions/stream?startup=true"),
        "after an outage the stream starts over: {}",
        lapi.requests()[0]
    );
    follower.abort();
    lapi.stop();
}
