//! The `otel_memory` contract's probes for one process ([`Tracer::trace_usdt`]): one
//! multi-uprobe link per program and object, each site with its semaphore (the kernel raises
//! it while the link lives and lowers it when the link closes, also when bridge-trace is
//! killed) and its argument spec in `USDT_SPECS`, found by the site's cookie.
use std::{num::NonZeroU32, path::PathBuf};

use aya::maps::{Array, MapData};
use bridge_trace_common::{names::map, names::program, UsdtSpec, MAX_USDT_SPECS};

use super::{chain, ebpf_err, Hit, Link, LinkKind, Tracer};
use crate::{
    error::{Error, Result},
    target::usdt::{Carrier, Site},
};

/// The contract's programs, by the probe each reads: what releases first, so that no sample
/// is recorded whose free could still be missed.
const PROGRAMS: &[(&str, &str)] = &[("free", program::USDT_FREE), ("alloc", program::USDT_ALLOC)];

/// The `USDT_SPECS` slots given out, by object and site: the same object mapped by many
/// processes shares them.
#[derive(Default)]
pub(super) struct Slots {
    given: Vec<(PathBuf, u64)>,
}

impl Tracer {
    /// Whether `pid`'s new samples are kept (`false`: it holds as many as its cap; they are
    /// counted and dropped until it is uncapped).
    pub fn cap_usdt(&mut self, pid: u32, capped: bool) -> Result<()> {
        let mut caps: aya::maps::HashMap<&mut MapData, u32, u32> =
            self.map_mut(map::USDT_CAPPED)?;
        let done = match capped {
            true => caps.insert(pid, 1, 0),
            false => match caps.remove(&pid) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            },
        };
        done.map_err(|e| ebpf_err(map::USDT_CAPPED, e))
    }

    /// Starts tracing `pid` through the `otel_memory` probes of `carriers` (the objects it
    /// maps that carry them): the process joins the targets, each sampled allocation it
    /// reports is kept with its stack and weight, each free of one forgets it. Returns the
    /// number of sites attached. Needs multi-uprobe links (their semaphore offsets).
    pub fn trace_usdt(&mut self, pid: u32, carriers: &[Carrier]) -> Result<usize> {
        let nz = NonZeroU32::new(pid).ok_or_else(|| Error::Usage("cannot trace pid 0".into()))?;
        if self.multi.is_none() {
            return Err(Error::Ebpf(
                "the otel_memory probes need multi-uprobe links (Linux 6.6), which are off here"
                    .into(),
            ));
        }
        self.add_target(pid)?;
        self.attach_exec_tracepoint()?;
        let mut attached = 0;
        for carrier in carriers {
            for &(probe, program) in PROGRAMS {
                let sites: Vec<&Site> = carrier.sites.iter().filter(|s| s.name == probe).collect();
                if sites.is_empty() {
                    continue;
                }
                let mut cookies = Vec::with_capacity(sites.len());
                for s in &sites {
                    cookies.push(self.usdt_slot(carrier, s)? as u64);
                }
                let offsets: Vec<u64> = sites.iter().map(|s| s.offset).collect();
                let semaphores: Vec<u64> = sites.iter().map(|s| s.semaphore.unwrap_or(0)).collect();
                let multi = self.multi.as_mut().expect("checked above");
                let linked = multi.attach(
                    program,
                    &carrier.host_path,
                    &offsets,
                    &cookies,
                    &semaphores,
                    pid,
                );
                let fd = match linked {
                    Ok(fd) => fd,
                    Err(e) => {
                        self.untrace_allocator(pid);
                        return Err(e);
                    }
                };
                attached += sites.len();
                // A USDT site is a nop, which the kernel emulates (a 5-byte one it turns into
                // a call after the first hit).
                self.links.entry(nz.get()).or_default().push(Link {
                    program,
                    hit: Hit::Nop,
                    kind: LinkKind::Multi {
                        fd,
                        places: sites.len(),
                    },
                });
            }
        }
        Ok(attached)
    }

    /// The `USDT_SPECS` slot of a site, written the first time.
    fn usdt_slot(&mut self, carrier: &Carrier, site: &Site) -> Result<u32> {
        let key = (carrier.host_path.clone(), site.offset);
        if let Some(i) = self.usdt_slots.given.iter().position(|k| *k == key) {
            return Ok(i as u32);
        }
        let slot = self.usdt_slots.given.len() as u32;
        if slot >= MAX_USDT_SPECS {
            return Err(Error::Ebpf(format!(
                "more than {MAX_USDT_SPECS} otel_memory probe sites"
            )));
        }
        let mut specs: Array<&mut MapData, UsdtSpec> = self.map_mut(map::USDT_SPECS)?;
        specs
            .set(slot, site.spec, 0)
            .map_err(|e| ebpf_err("writing a USDT argument spec", chain(&e)))?;
        self.usdt_slots.given.push(key);
        Ok(slot)
    }
}
