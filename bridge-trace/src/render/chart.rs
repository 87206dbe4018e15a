//! The timeline as an inline SVG picture: what the traced allocations held over time, the
//! top call sites stacked (the rest as one grey band), the process's resident set as a dashed
//! line beside them, the peak marked, and the recording's events as vertical rules. Plain
//! shapes, no script: it is readable as a picture in a ticket.
use std::fmt::Write as _;

use super::html::esc;
use crate::{aggregate::TimelineReport, units::human_bytes};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 320.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 40.0;
/// A colour per series (colour-blind-safe, Okabe-Ito), the rest grey.
const COLOURS: [&str; 8] = [
    "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#999933",
];
const OTHER: &str = "#cccccc";

/// The chart, or `None` when the timeline has no point to draw.
pub(crate) fn timeline_svg(t: &TimelineReport) -> Option<String> {
    if t.points.is_empty() {
        return None;
    }
    let end = t.points.last().map_or(0.0, |p| p.at_secs).max(1e-3);
    let top = t
        .points
        .iter()
        .map(|p| p.bytes.max(p.rss_bytes.unwrap_or(0) as f64))
        .fold(1.0, f64::max);
    let (w, h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |secs: f64| LEFT + w * secs / end;
    let y = |bytes: f64| TOP + h * (1.0 - bytes / top);
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg id=\"bt-timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" \
         height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" \
         font-size=\"12\" role=\"img\" aria-label=\"memory held over time\">\
         <rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{w}\" height=\"{h}\" fill=\"#fafafa\" \
         stroke=\"#888\"/>"
    );
    // Axes: bytes at 0, half and the top; seconds at 0, half and the end.
    for f in [0.0, 0.5, 1.0] {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0} s</text>",
            LEFT - 6.0,
            y(top * f) + 4.0,
            human_bytes((top * f) as u64),
            LEFT + w,
            y(top * f),
            y(top * f),
            x(end * f),
            TOP + h + 16.0,
            end * f
        );
    }
    // The bands, bottom up: each series on the ones below it, then the rest of the total.
    let mut below = vec![0.0f64; t.points.len()];
    let mut band = |svg: &mut String, values: &[f64], colour: &str, label: &str| {
        let upper: Vec<f64> = below.iter().zip(values).map(|(b, v)| b + v).collect();
        let mut pts = String::new();
        for (p, u) in t.points.iter().zip(&upper) {
            let _ = write!(pts, "{:.1},{:.1} ", x(p.at_secs), y(*u));
        }
        for (p, b) in t.points.iter().zip(&below).rev() {
            let _ = write!(pts, "{:.1},{:.1} ", x(p.at_secs), y(*b));
        }
        let _ = write!(
            svg,
            "<polygon class=\"bt-band\" data-site=\"{}\" points=\"{}\" fill=\"{colour}\" \
             stroke=\"{colour}\"><title>{}</title></polygon>",
            esc(label),
            pts.trim_end(),
            esc(label)
        );
        below = upper;
    };
    for (i, s) in t.series.iter().enumerate() {
        band(&mut svg, &s.bytes, COLOURS[i % COLOURS.len()], &s.site);
    }
    let rest: Vec<f64> = t
        .points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let drawn: f64 = t.series.iter().filter_map(|s| s.bytes.get(i)).sum();
            (p.bytes - drawn).max(0.0)
        })
        .collect();
    band(&mut svg, &rest, OTHER, "other call sites");
    // The resident set, where it was read.
    let rss: Vec<String> = t
        .points
        .iter()
        .filter_map(|p| {
            p.rss_bytes
                .map(|r| format!("{:.1},{:.1}", x(p.at_secs), y(r as f64)))
        })
        .collect();
    if !rss.is_empty() {
        let _ = write!(
            svg,
            "<polyline class=\"bt-rss\" points=\"{}\" fill=\"none\" stroke=\"#000\" \
             stroke-width=\"2\" stroke-dasharray=\"6 4\"><title>resident set (RSS)</title>\
             </polyline>",
            rss.join(" ")
        );
    }
    for e in &t.events {
        let ex = x(e.at_secs.min(end));
        let _ = write!(
            svg,
            "<line class=\"bt-event\" x1=\"{ex:.1}\" x2=\"{ex:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" \
             stroke=\"#7a0177\" stroke-dasharray=\"2 3\"><title>{:.1} s: {}</title></line>",
            TOP + h,
            e.at_secs,
            esc(&e.what)
        );
    }
    if let Some(p) = &t.peak {
        let (px, py) = (x(p.at_secs.min(end)), y(p.bytes as f64));
        let anchor = if px > LEFT + w * 0.8 { "end" } else { "start" };
        let _ = write!(
            svg,
            "<circle class=\"bt-peak\" cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"5\" fill=\"none\" \
             stroke=\"#c00\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\" \
             text-anchor=\"{anchor}\" fill=\"#c00\">peak {} at {:.1} s</text>",
            if anchor == "end" { px - 8.0 } else { px + 8.0 },
            (py - 8.0).max(TOP + 12.0),
            human_bytes(p.bytes),
            p.at_secs
        );
    }
    svg.push_str("</svg>");
    Some(svg)
}

/// The chart's legend, as HTML: each series' colour and site, the rest, the resident set.
pub(crate) fn legend_html(t: &TimelineReport) -> String {
    let mut out = String::from("<ul class=\"bt-legend\">");
    let item = |out: &mut String, colour: &str, label: &str| {
        let _ = write!(
            out,
            "<li><span style=\"background:{colour}\"></span><code>{}</code></li>",
            esc(label)
        );
    };
    for (i, s) in t.series.iter().enumerate() {
        item(&mut out, COLOURS[i % COLOURS.len()], &s.site);
    }
    item(&mut out, OTHER, "other call sites");
    out.push_str(
        "<li><span style=\"background:none;border-top:2px dashed #000;height:0\"></span>\
         resident set (RSS)</li></ul>",
    );
    out
}
