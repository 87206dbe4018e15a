//! The whole report as JSON: metadata (with what was lost) and every stack with its frames
//! (module, offset, function, file, line).
use super::Render;
use crate::aggregate::Report;

pub struct Json;

impl Render for Json {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, report)?;
        out.push(b'\n');
        Ok(())
    }
}
