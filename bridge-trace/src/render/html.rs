//! One self-contained HTML page for an incident ticket: what was traced (where, when, how long),
//! what is held and how fast it grew, how sure the figures are, the top call sites, and the
//! interactive flamegraph inline with a search box. No external resources: it opens anywhere.
use std::io::Write as _;

use super::{site, Render, Svg};
use crate::aggregate::Report;
use crate::units::human_bytes;

pub struct Html {
    pub top: usize,
}

/// Text made safe for HTML (and SVG) element content and attribute values.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}\
table{border-collapse:collapse}td,th{padding:.2em .8em;text-align:left;vertical-align:top}\
th{background:#eee}tr:nth-child(even) td{background:#f7f7f7}td.n{text-align:right}\
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}\
dd{margin:0}code{font-size:.9em}.ok{color:#060}.warn{color:#a40}\
#flamegraph svg{width:100%}#bt-chart img{max-width:100%;height:auto}\
.bt-legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.3em 1.2em}\
.bt-legend span{display:inline-block;width:1.6em;height:.9em;margin-right:.4em}\
table.bt-sort th{cursor:pointer}.leaking{color:#b00;font-weight:bold}\
iframe.bt-flame{width:100%;height:640px;border:0}";

/// The page's own script: the search box drives the flamegraph's search (inferno's
/// `search`/`reset_search`), and `?q=TERM` in the page's address fills it in.
const SCRIPT: &str = "(function(){\
var box=document.getElementById('bt-search');\
function run(){if(typeof search!=='function')return;reset_search();\
if(box.value)search(box.value);}\
box.addEventListener('input',run);\
window.addEventListener('load',function(){\
var q=new URLSearchParams(window.location.search).get('q');\
if(q){box.value=q;box.dispatchEvent(new Event('input'));}});\
document.querySelectorAll('table.bt-sort th').forEach(function(th,i){\
th.title='sort';th.addEventListener('click',function(){\
var rows=[].slice.call(th.closest('table').rows,1),asc=th.dataset.asc!=='1';\
th.dataset.asc=asc?'1':'0';rows.sort(function(a,b){\
var x=a.cells[i].dataset.v||a.cells[i].textContent,y=b.cells[i].dataset.v||b.cells[i].textContent,\
nx=parseFloat(x),ny=parseFloat(y),c=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;\
return asc?c:-c;});rows.forEach(function(r){r.parentNode.appendChild(r);});});});\
})();";

impl Render for Html {
    fn render(&self, report: &Report, out: &mut Vec<u8>) -> std::io::Result<()> {
        let m = &report.meta;
        let total = report.total_bytes();
        writeln!(out, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>")?;
        writeln!(out, "<meta charset=\"utf-8\">")?;
        writeln!(
            out,
            "<title>bridge-trace: {} (pid {}), memory never freed</title>",
            esc(&m.target),
            m.pid
        )?;
        writeln!(out, "<style>{STYLE}</style>\n</head>\n<body>")?;
        writeln!(
            out,
            "<h1>Memory held and never freed: {} (pid {})</h1>",
            esc(&m.target),
            m.pid
        )?;

        writeln!(out, "<dl>")?;
        let mut row = |k: &str, v: String| writeln!(out, "<dt>{k}</dt><dd>{v}</dd>");
        if let Some(exe) = &m.exe {
            row("Executable", format!("<code>{}</code>", esc(exe)))?;
        }
        let machine = [m.host.as_deref(), m.kernel.as_deref()]
            .into_iter()
            .flatten()
            .map(esc)
            .collect::<Vec<_>>();
        if !machine.is_empty() {
            row("Host, kernel", machine.join(", "))?;
        }
        if let Some(started) = &m.started {
            row("Started", esc(started))?;
        }
        row(
            "Traced",
            format!(
                "{:.1} s{}{}",
                m.duration_secs,
                if m.target_exited {
                    ", until the target exited"
                } else {
                    ""
                },
                m.tier
                    .as_deref()
                    .map(|t| format!(" (tier: {})", esc(t)))
                    .unwrap_or_default()
            ),
        )?;
        row("Allocator", format!("<code>{}</code>", esc(&m.allocator)))?;
        row(
            "Outstanding",
            format!(
                "<strong>{}</strong> ({total} bytes) in {} allocations from {} call stacks",
                human_bytes(total),
                report.total_count(),
                report.stacks.len()
            ),
        )?;
        if m.duration_secs > 0.0 {
            row(
                "Growth",
                format!(
                    "{}/s while traced (outstanding bytes allocated in the window ÷ its length)",
                    human_bytes((total as f64 / m.duration_secs) as u64)
                ),
            )?;
        }
        if let Some(age) = m.min_age_secs {
            row(
                "Filter",
                format!(
                    "allocations at least {age} s old ({} younger ones left out)",
                    m.younger_than_min_age
                ),
            )?;
        }
        writeln!(out, "</dl>")?;

        timeline_section(out, report)?;

        writeln!(out, "<h2>How sure these figures are</h2>")?;
        let c = &m.counters;
        writeln!(
            out,
            "<p>Seen: {} allocations, {} frees ({} failed allocations).{}</p>",
            c.allocs,
            c.frees,
            c.failed_allocs,
            m.unwind
                .as_ref()
                .map(|u| format!(" Stacks: {}.", esc(&u.describe())))
                .unwrap_or_default()
        )?;
        let caveats = report.caveats();
        if caveats.is_empty() {
            writeln!(
                out,
                "<p class=\"ok\">Nothing was lost: every allocation and free while tracing was \
                 recorded, with its stack.</p>"
            )?;
        } else {
            writeln!(out, "<ul class=\"warn\">")?;
            for caveat in &caveats {
                writeln!(out, "<li>{}</li>", esc(caveat))?;
            }
            writeln!(out, "</ul>")?;
        }

        writeln!(out, "<h2>Top call sites holding memory</h2>")?;
        writeln!(
            out,
            "<p>Click a column to sort.</p>\n<table class=\"bt-sort\" id=\"bt-sites\">\n<tr>\
             <th>#</th><th>Bytes</th><th>Allocations</th><th>Oldest</th><th>Class</th>\
             <th>Call site</th><th>Where</th></tr>"
        )?;
        for (i, s) in report.stacks.iter().take(self.top).enumerate() {
            let class = s.class.as_deref().unwrap_or("");
            let runtime = s
                .runtime
                .as_deref()
                .map(|r| format!("<br><small>runtime: {}</small>", esc(r)))
                .unwrap_or_default();
            let (name, at) = site(s);
            let chain: Vec<String> = s
                .frames
                .iter()
                .rev()
                .map(|f| esc(f.display_name()))
                .collect();
            writeln!(
                out,
                "<tr><td class=\"n\">{}</td><td class=\"n\" data-v=\"{}\">{} ({})</td>\
                 <td class=\"n\">{}</td><td class=\"n\" data-v=\"{}\">{:.1} s</td>\
                 <td class=\"{class}\">{class}{runtime}</td><td><details><summary><code>{}</code>{}\
                 </summary><code>{}</code></details></td><td><code>{}</code></td></tr>",
                i + 1,
                s.bytes,
                s.bytes,
                human_bytes(s.bytes),
                s.count,
                s.oldest_age_secs,
                s.oldest_age_secs,
                esc(&name),
                if s.partial {
                    " (direct caller only)"
                } else {
                    ""
                },
                chain.join("<br>← "),
                esc(&at)
            )?;
        }
        writeln!(out, "</table>")?;
        if report.stacks.len() > self.top {
            writeln!(
                out,
                "<p>… and {} more stacks, all in the flamegraph.</p>",
                report.stacks.len() - self.top
            )?;
        }

        if let Some(allocated) = report.allocated.as_ref().filter(|a| !a.is_empty()) {
            let bytes: u64 = allocated.iter().map(|s| s.bytes).sum();
            writeln!(out, "<h2>Hottest allocation sites</h2>")?;
            writeln!(
                out,
                "<p>Allocated while traced, freed or not: <strong>{}</strong> ({bytes} bytes) in \
                 {} allocations (<code>--view alloc</code> draws them as a flamegraph).</p>",
                human_bytes(bytes),
                allocated.iter().map(|s| s.count).sum::<u64>()
            )?;
            writeln!(
                out,
                "<table class=\"bt-sort\">\n<tr><th>#</th><th>Bytes</th><th>Allocations</th>\
                 <th>Lifetimes of the freed ones</th><th>Call site</th><th>Where</th></tr>"
            )?;
            for (i, s) in super::hottest_sites(allocated, self.top).iter().enumerate() {
                let (name, at) = (&s.name, &s.at);
                let lifetimes = s
                    .lifetimes
                    .as_deref()
                    .and_then(super::describe_lifetimes)
                    .unwrap_or_else(|| "none freed".into());
                writeln!(
                    out,
                    "<tr><td class=\"n\">{}</td><td class=\"n\" data-v=\"{}\">{} ({})</td>\
                     <td class=\"n\">{}</td><td>{}</td><td><code>{}</code></td>\
                     <td><code>{}</code></td></tr>",
                    i + 1,
                    s.bytes,
                    s.bytes,
                    human_bytes(s.bytes),
                    s.count,
                    esc(&lifetimes),
                    esc(name),
                    esc(at)
                )?;
            }
            writeln!(out, "</table>")?;
        }

        writeln!(out, "<h2>Flamegraph</h2>")?;
        writeln!(
            out,
            "<p><label>Search functions (regular expression): <input id=\"bt-search\" \
             type=\"search\" size=\"40\"></label> Click a frame to zoom.</p>"
        )?;
        let mut svg = Vec::new();
        Svg.render(report, &mut svg)?;
        let svg = String::from_utf8_lossy(&svg);
        // Inline: the XML declaration and doctype belong to a standalone file only.
        let start = svg.find("<svg").unwrap_or(0);
        writeln!(out, "<div id=\"flamegraph\">\n{}\n</div>", &svg[start..])?;
        // Bottom-up in a frame of its own: two inferno pictures in one document would share
        // their element ids and scripts.
        let mut inverted = Vec::new();
        super::svg::flamegraph(report, true, &mut inverted)?;
        writeln!(
            out,
            "<h2>Bottom-up: who calls each site</h2>\n<iframe class=\"bt-flame\" \
             id=\"bt-bottom-up\" title=\"bottom-up flamegraph\" srcdoc=\"{}\"></iframe>",
            esc(&String::from_utf8_lossy(&inverted))
        )?;
        writeln!(out, "<script>{SCRIPT}</script>\n</body>\n</html>")?;
        Ok(())
    }
}

/// `svg` as the data of a `data:` address in an attribute.
fn data_uri(svg: &str) -> String {
    let mut out = String::with_capacity(svg.len() + svg.len() / 8);
    for c in svg.chars() {
        match c {
            '%' => out.push_str("%25"),
            '#' => out.push_str("%23"),
            '"' => out.push_str("%22"),
            '<' => out.push_str("%3C"),
            '>' => out.push_str("%3E"),
            '&' => out.push_str("%26"),
            '\n' => out.push_str("%0A"),
            c => out.push(c),
        }
    }
    out
}

/// The chart of what was held over time and the peak's stacks, or a line saying why there is
/// none.
fn timeline_section(out: &mut Vec<u8>, report: &Report) -> std::io::Result<()> {
    writeln!(out, "<h2>Over time</h2>")?;
    let Some(t) = &report.timeline else {
        return writeln!(
            out,
            "<p>No timeline: this capture was written before capture format version 4 (or \
             the recording ended before its first tick).</p>"
        );
    };
    let Some(svg) = super::chart::timeline_svg(t) else {
        return writeln!(out, "<p>No timeline: no tick was taken.</p>");
    };
    writeln!(
        out,
        "<p>What the traced allocations held, a point every {:.2} s, the {} call sites that \
         held the most stacked and the rest in grey; the dashed line is the process's resident \
         set.</p>\n<div id=\"bt-chart\"><img alt=\"memory held over time\" \
         src=\"data:image/svg+xml,{}\"></div>\n{}",
        t.every_secs,
        t.series.len(),
        // A picture, not inline: inferno's script takes the page's first <svg> for its own.
        data_uri(&svg),
        super::chart::legend_html(t)
    )?;
    if let Some(p) = &t.peak {
        writeln!(
            out,
            "<h2>Peak</h2>\n<p>The most held at once: <strong>{}</strong> ({} bytes) in {} \
             allocations at {:.1} s (totals read every {:.2} s; <code>--view peak</code> draws \
             it as a flamegraph). The call sites that held it:</p>",
            human_bytes(p.bytes),
            p.bytes,
            p.count,
            p.at_secs,
            t.peak_every_secs
        )?;
        writeln!(
            out,
            "<table id=\"bt-peak\">\n<tr><th>Bytes</th><th>Allocations</th><th>Call site</th>\
             <th>Where</th></tr>"
        )?;
        for s in p.stacks.iter().take(10) {
            let (name, at) = site(s);
            writeln!(
                out,
                "<tr><td class=\"n\">{} ({})</td><td class=\"n\">{}</td><td><code>{}</code>\
                 </td><td><code>{}</code></td></tr>",
                s.bytes,
                human_bytes(s.bytes),
                s.count,
                esc(&name),
                esc(&at)
            )?;
        }
        writeln!(out, "</table>")?;
    }
    Ok(())
}
