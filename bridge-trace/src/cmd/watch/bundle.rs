//! What a watch writes to `--out-dir`: periodic snapshots, the oldest pruned past `--keep`, and
//! an incident bundle at every alert. Each is a directory of the usual reports (flamegraph,
//! folded stacks, pprof, JSON, text), written under a temporary name and renamed whole, so that a
//! reader never sees half a bundle.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::{
    aggregate::Report,
    error::{Error, Result},
    output::hand_over,
    render::{render_to_vec, Format, RenderOptions},
};

const FILES: [(&str, Format); 6] = [
    ("leaks.svg", Format::Svg),
    ("leaks.folded", Format::Folded),
    ("leaks.pb.gz", Format::Pprof),
    ("report.json", Format::Json),
    ("report.txt", Format::Text),
    ("report.html", Format::Html),
];

/// Writes `dir/name/` with every report of `report`, and `alert.txt` when `alert` is given,
/// each file with permissions `mode` (the directory searchable where readable) and, under
/// sudo, the invoking user's.
pub fn write(
    dir: &Path,
    name: &str,
    report: &Report,
    alert: Option<&str>,
    mode: u32,
) -> Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| io("creating", e))?;
    let written = (|| {
        let put = |file: &str, bytes: &[u8]| {
            let mut f = std::fs::File::create(tmp.join(file))?;
            hand_over(&f, mode)?;
            f.write_all(bytes)
        };
        for (file, format) in FILES {
            let bytes = render_to_vec(report, format, RenderOptions::default())?;
            put(file, &bytes).map_err(|e| io("writing into", e))?;
        }
        if let Some(alert) = alert {
            put("alert.txt", format!("{alert}\n").as_bytes()).map_err(|e| io("writing into", e))?;
        }
        std::fs::File::open(&tmp)
            .and_then(|d| hand_over(&d, mode))
            .map_err(|e| io("setting the permissions of", e))?;
        std::fs::rename(&tmp, &target).map_err(|e| io("renaming", e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written.map(|()| target)
}

/// Removes the oldest `prefix*` bundles of `dir` beyond the newest `keep`, and then while they
/// take more than `max_bytes` together (the newest always stays).
pub fn prune(dir: &Path, prefix: &str, keep: usize, max_bytes: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // Names end in a UTC time stamp: their order is their age.
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    let remove = |name: &str| {
        if let Err(e) = std::fs::remove_dir_all(dir.join(name)) {
            tracing::warn!(bundle = %name, error = %e, "could not prune an old snapshot");
        }
    };
    for name in &names[..excess] {
        remove(name);
    }
    let kept = &names[excess..];
    let sizes: Vec<u64> = kept.iter().map(|n| dir_size(&dir.join(n))).collect();
    let mut total: u64 = sizes.iter().sum();
    for (name, size) in kept.iter().zip(&sizes).take(kept.len().saturating_sub(1)) {
        if total <= max_bytes {
            break;
        }
        remove(name);
        total -= size;
    }
}

/// Bytes of the files directly in `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for stamp in ["20260101-000003", "20260101-000001", "20260101-000002"] {
            std::fs::create_dir(dir.path().join(format!("snapshot-{stamp}"))).unwrap();
        }
        std::fs::create_dir(dir.path().join("incident-20260101-000000")).unwrap();
        prune(dir.path(), "snapshot-", 2, u64::MAX);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "incident-20260101-000000",
                "snapshot-20260101-000002",
                "snapshot-20260101-000003"
            ]
        );
        // Over the size limit: the oldest go until it fits, the newest stays.
        for stamp in ["20260101-000002", "20260101-000003"] {
            let file = dir.path().join(format!("snapshot-{stamp}/leaks.svg"));
            std::fs::write(file, vec![0u8; 1000]).unwrap();
        }
        prune(dir.path(), "snapshot-", 2, 1500);
        assert!(!dir.path().join("snapshot-20260101-000002").exists());
        assert!(dir.path().join("snapshot-20260101-000003").exists());
        prune(dir.path(), "snapshot-", 2, 10);
        assert!(dir.path().join("snapshot-20260101-000003").exists());
    }
}
