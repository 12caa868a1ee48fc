//! Putting the pins back when they are removed under a running agent (`guard unload --force`,
//! or someone's `rm -r` on bpffs): the links go with their pins, so protection is lost until
//! the agent notices. It keeps a second handle on every map it pinned, so it can pin the same
//! maps again (their contents, counters and flow memory included) and attach afresh.

use std::path::PathBuf;

use aya::maps::MapData;

use crate::kernel::pins::{PinError, Pins};

#[derive(Debug, thiserror::Error)]
pub enum RepinError {
    #[error("cannot open the pinned map {path} for safekeeping: {source}")]
    Open { path: PathBuf, source: aya::maps::MapError },
    #[error("cannot pin the map {name} again at {path}: {source}")]
    Pin { name: &'static str, path: PathBuf, source: aya::pin::PinError },
    #[error(transparent)]
    Pins(#[from] PinError),
}

/// A handle on every map the agent pinned, independent of the pins.
pub struct MapHandles {
    maps: Vec<(&'static str, MapData)>,
}

impl MapHandles {
    /// Opens every map pinned under `pins` (call right after loading).
    pub fn open(pins: &Pins) -> Result<Self, RepinError> {
        let maps = guard_common::maps::ALL
            .iter()
            .map(|name| {
                let path = pins.map(name);
                MapData::from_pin(&path)
                    .map(|data| (*name, data))
                    .map_err(|source| RepinError::Open { path, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(MapHandles { maps })
    }

    /// Whether every map is still pinned where the agent pinned it.
    pub fn intact(&self, pins: &Pins) -> bool {
        self.maps.iter().all(|(name, _)| pins.map(name).exists())
    }

    /// Creates the pin directory again and pins every map whose pin is gone.
    pub fn restore(&self, pins: &Pins) -> Result<(), RepinError> {
        pins.create()?;
        for (name, data) in &self.maps {
            let path = pins.map(name);
            if !path.exists() {
                data.pin(&path).map_err(|source| RepinError::Pin { name, path, source })?;
            }
        }
        Ok(())
    }
}
