//! `guard drops` and `guard access`: one client for the agent's record streams. It prints
//! what the agent kept and, following, each new record as it comes.

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use super::{Record, recent::RECENT};
use crate::host::clock::{utc, wall_seconds_now};

/// What the command shows of the records the agent kept.
#[derive(Clone, Copy, Debug, Default)]
pub struct Selection {
    /// Only records this recent.
    pub since: Option<std::time::Duration>,
    /// Only the last this many (of the recent ones; new ones under --follow all show).
    pub limit: Option<usize>,
}

/// Prints the running agent's recent records of `T`'s stream (and, with `follow`, new ones as
/// they come), as lines for people or (`json`) one JSON object per line.
pub async fn show<T: Record>(
    metrics_addr: &str,
    follow: bool,
    json: bool,
    selection: Selection,
) -> anyhow::Result<()> {
    let kind = T::KIND;
    let mut stream = TcpStream::connect(metrics_addr).await.with_context(|| {
        format!(
            "cannot reach the agent at {metrics_addr}: is `guard run` running (see --metrics-addr)?"
        )
    })?;
    let query = if follow { "?follow=1" } else { "" };
    stream.write_all(format!("GET {}{query} HTTP/1.0\r\n\r\n", kind.route).as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    // Skip the status line and headers.
    while let Some(line) = lines.next_line().await? {
        if line.is_empty() {
            break;
        }
    }
    let oldest = selection.since.map(|since| wall_seconds_now() - since.as_secs_f64());
    let print = |record: &T| {
        if json {
            println!("{}", serde_json::to_string(record).unwrap_or_default());
        } else {
            println!("{} {}", utc(record.time()), record.line());
        }
    };
    // The agent sends what it kept first, then (following) each new record as it happens: a
    // pause in the lines ends the backlog, which the selection's limit applies to.
    let mut backlog = Vec::new();
    let (mut shown, mut live) = (0, false);
    loop {
        let next = if follow && !live {
            let pause = std::time::Duration::from_millis(200);
            match tokio::time::timeout(pause, lines.next_line()).await {
                Ok(line) => line?,
                Err(_) => {
                    shown += flush(&mut backlog, selection.limit, &print);
                    live = true;
                    continue;
                }
            }
        } else {
            lines.next_line().await?
        };
        let Some(line) = next else { break };
        let record: T = serde_json::from_str(&line)
            .with_context(|| format!("a {} record from the agent", kind.singular))?;
        if oldest.is_some_and(|oldest| record.time() < oldest) {
            continue;
        }
        if live {
            print(&record);
            shown += 1;
        } else {
            backlog.push(record);
        }
    }
    shown += flush(&mut backlog, selection.limit, &print);
    if follow {
        eprintln!("guard {}: the agent closed the stream (it stopped or restarted)", kind.command);
    } else if shown == 0 {
        eprintln!(
            "guard {}: no {}{} among the last {RECENT} the agent keeps",
            kind.command,
            kind.plural,
            selection.since.map(|s| format!(" in the last {s:?}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Prints the last `limit` (or all) of `records` and empties it; returns how many it printed.
fn flush<T>(records: &mut Vec<T>, limit: Option<usize>, print: &impl Fn(&T)) -> usize {
    let skip = limit.map_or(0, |limit| records.len().saturating_sub(limit));
    let shown = records.len() - skip;
    records.drain(..).skip(skip).for_each(|r| print(&r));
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_keeps_the_last_records() {
        let mut records: Vec<u32> = (0..5).collect();
        let printed = std::cell::RefCell::new(Vec::new());
        let shown = flush(&mut records, Some(2), &|r: &u32| printed.borrow_mut().push(*r));
        assert_eq!((shown, printed.into_inner()), (2, vec![3, 4]));
        assert!(records.is_empty());
    }
}
