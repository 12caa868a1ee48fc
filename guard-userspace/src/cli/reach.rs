//! Who outside reaches a port: the answer `guard status` reads from the maps and the policy,
//! `guard scan` from its probes, and the exposure alerts compare.
//!
//! Its serde form is scan's (and the alerts'): `{"who": "nobody"}`, `sources` only when
//! listed. `guard status` renders the same value in its own, older words ("none", `sources`
//! always): see `status::Outside`.

use serde::{Deserialize, Serialize};

/// Whom a [`Reach`] lets in. Ordered as the words sort.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Who {
    Everyone,
    /// Only the [`Reach::sources`].
    Listed,
    #[default]
    Nobody,
}

impl Who {
    /// "everyone", "listed" or "nobody".
    pub fn word(self) -> &'static str {
        match self {
            Who::Everyone => "everyone",
            Who::Listed => "listed",
            Who::Nobody => "nobody",
        }
    }
}

/// Who outside reaches a target (local, the host, and bridge, other containers, always may).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Reach {
    pub who: Who,
    /// The source prefixes that get through when `who` is [`Who::Listed`]: sorted, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
}

impl Reach {
    pub fn everyone() -> Self {
        Reach { who: Who::Everyone, sources: Vec::new() }
    }

    pub fn nobody() -> Self {
        Reach { who: Who::Nobody, sources: Vec::new() }
    }

    /// Only `sources` (sorted and deduplicated here); nobody when there are none.
    pub fn listed(mut sources: Vec<String>) -> Self {
        if sources.is_empty() {
            return Reach::nobody();
        }
        sources.sort();
        sources.dedup();
        Reach { who: Who::Listed, sources }
    }

    /// From whether an unnamed source gets through and which named prefixes do.
    pub fn from_probes(anyone: bool, passed: Vec<String>) -> Self {
        if anyone { Reach::everyone() } else { Reach::listed(passed) }
    }

    pub fn is_open(&self) -> bool {
        self.who != Who::Nobody
    }

    /// Whether `self` lets in anyone that `before` did not.
    pub fn wider_than(&self, before: &Reach) -> bool {
        match (self.who, before.who) {
            (_, Who::Everyone) | (Who::Nobody, _) => false,
            (Who::Everyone, _) => true,
            (Who::Listed, Who::Listed | Who::Nobody) => {
                self.sources.iter().any(|s| !before.sources.contains(s))
            }
        }
    }

    /// For people: the sources when listed, else "everyone" or "nobody".
    pub fn text(&self) -> String {
        match self.who {
            Who::Listed => self.sources.join(", "),
            who => who.word().to_owned(),
        }
    }
}
