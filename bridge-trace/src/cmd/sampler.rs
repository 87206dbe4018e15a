//! `bridge-trace sampler install DIR`: writes the in-process sampler the binary carries
//! ([`crate::target::sampler`]) where a service can preload it, and says how.
use std::path::{Path, PathBuf};

use crate::{error::Result, target::sampler};

/// Installs the library into `dir`; returns its path and the line that says what to do next.
pub fn install(dir: &Path) -> Result<(PathBuf, String)> {
    let path = sampler::install(dir)?;
    let advice = format!(
        "preload it into a service and restart it once (a systemd drop-in: \
         [Service] Environment=LD_PRELOAD={}); `bridge-trace watch --pid PID` then traces it \
         at tier usdt. {}=SIZE sets its mean sampling interval (default 512KiB)",
        path.display(),
        sampler::INTERVAL_ENV
    );
    Ok((path, advice))
}
