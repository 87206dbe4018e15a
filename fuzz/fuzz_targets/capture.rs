//! Raw captures for `bridge-trace report` and `diff`: any bytes give a capture or an error,
//! never a panic; so does any JSON body behind a valid header (the gzip CRC would otherwise
//! keep the fuzzer out of the parser), and a capture that loads always aggregates and renders.
#![no_main]
use std::io::Write as _;

use bridge_trace::{
    aggregate::aggregate,
    capture::{Capture, MAGIC, VERSION},
    model::maps::Module,
    render::folded_lines,
    symbolize::{Frame, Symbolize},
};
use libfuzzer_sys::fuzz_target;

/// Names nothing (no file of the fuzzer's choosing is opened).
struct Unnamed;

impl Symbolize for Unnamed {
    fn symbolize(&mut self, module: &Module, offsets: &[u64]) -> Vec<Vec<Frame>> {
        offsets
            .iter()
            .map(|&o| vec![Frame::unknown(Some(module.path.clone()), Some(o))])
            .collect()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut framed = MAGIC.to_vec();
    framed.extend_from_slice(&VERSION.to_le_bytes());
    let mut gz = flate2::write::GzEncoder::new(framed, flate2::Compression::fast());
    gz.write_all(data).unwrap();
    let framed = gz.finish().unwrap();
    for bytes in [data, framed.as_slice()] {
        if let Ok(capture) = Capture::from_bytes(bytes) {
            let report = aggregate(&capture, &mut Unnamed);
            let _ = folded_lines(&report);
            let _ = capture.to_bytes().unwrap();
        }
    }
});
