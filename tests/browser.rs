//! A real browser opens the reports: Debian's Chromium, headless (installed by `cargo xtask
//! setup`), loads the golden SVG flamegraph and HTML page (`tests/data/report.*`, which the
//! golden tests hold to the renderers' output), runs their scripts, and searches for the leak
//! site through the page's own search (the SVG's `?s=` state, the HTML's search box via `?q=`).
//! The DOM after the scripts ran must hold the site and the search's result, and a screenshot
//! must show the flamegraph drawn with the site highlighted.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The golden report's largest site.
const LEAK_SITE: &str = "reject_message";
/// inferno's colour for frames the search matched.
const MATCHED_RGB: [u8; 3] = [230, 0, 230];

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(name)
}

/// Runs headless Chromium on `url` with `args`, in a profile of its own.
fn chromium(dir: &Path, args: &[&str], url: &str) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            // Root has no user namespace sandbox to drop into.
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            // Tall enough for the HTML page down to its flamegraph.
            "--window-size=1300,3600",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "chromium {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's DOM after its scripts ran, and a screenshot's pixels (RGBA).
fn open(name: &str, query: &str) -> (String, png::OutputInfo, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join(name);
    std::fs::copy(data(name), &page).unwrap();
    let url = format!("file://{}?{query}={LEAK_SITE}", page.display());
    let dom = chromium(dir.path(), &["--dump-dom"], &url);
    let shot = dir.path().join("shot.png");
    chromium(
        dir.path(),
        &[&format!("--screenshot={}", shot.display())],
        &url,
    );
    let mut decoder =
        png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    pixels.truncate(info.buffer_size());
    (dom, info, pixels)
}

fn assert_rendered_and_found(name: &str, query: &str) {
    let (dom, info, pixels) = open(name, query);
    assert!(dom.contains(LEAK_SITE), "{name}: no {LEAK_SITE} in the DOM");
    // The search ran: inferno marks the matched share and recolours the matched frames.
    assert!(
        dom.contains("Matched: "),
        "{name}: the search found nothing: {}",
        &dom[dom.len().saturating_sub(2000)..]
    );
    let fill = format!(
        "rgb({},{},{})",
        MATCHED_RGB[0], MATCHED_RGB[1], MATCHED_RGB[2]
    );
    assert!(
        dom.contains(&fill),
        "{name}: no frame recoloured by the search"
    );
    // And the pixels show it: a band of the matched colour as wide as most of the page (the
    // leak site holds nearly all the bytes), among the other frames' colours.
    let channels = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let px = |x: usize, y: usize| &pixels[(y * w + x) * channels..][..3];
    let widest_match = (0..h)
        .map(|y| (0..w).filter(|&x| px(x, y) == MATCHED_RGB).count())
        .max()
        .unwrap();
    assert!(
        widest_match > w / 2,
        "{name}: the screenshot's widest row of matched frames is {widest_match} of {w} px"
    );
    let mut colours: Vec<[u8; 3]> = (0..h)
        .step_by(4)
        .flat_map(|y| (0..w).step_by(4).map(move |x| (x, y)))
        .map(|(x, y)| px(x, y).try_into().unwrap())
        .collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 20, "{name}: {} colours only", colours.len());
}

/// The HTML page's timeline chart is drawn: the two call sites the golden timeline holds most
/// (the leak in the chart's first colour, the route table in its second) cover an area of the
/// screenshot each, the resident set's dashed line and the peak's red mark are there, and the
/// page carries its bottom-up flamegraph and sortable site table.
#[test]
fn chromium_draws_the_timeline_chart() {
    let (dom, info, pixels) = open("report.html", "q");
    assert!(dom.contains("id=\"bt-chart\""), "no chart in the page");
    assert!(
        dom.contains("id=\"bt-bottom-up\""),
        "no bottom-up flamegraph"
    );
    assert!(
        dom.contains("class=\"bt-sort\" id=\"bt-sites\""),
        "no sortable table"
    );
    let channels = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let count = |rgb: [u8; 3]| {
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .filter(|&(x, y)| pixels[(y * w + x) * channels..][..3] == rgb)
            .count()
    };
    // Okabe-Ito orange and sky blue: the first two series; the peak's mark; the rest's grey.
    let leak = count([0xe6, 0x9f, 0x00]);
    let routes = count([0x56, 0xb4, 0xe9]);
    let peak = count([0xcc, 0x00, 0x00]);
    assert!(leak > 20_000, "the leak's band: {leak} px");
    assert!(routes > 500, "the route table's band: {routes} px");
    assert!(peak > 20, "the peak's mark: {peak} px");
    // The leak grows: its band is taller at the right of the chart than at the left.
    let column = |x: usize| {
        (0..h)
            .filter(|&y| pixels[(y * w + x) * channels..][..3] == [0xe6, 0x9f, 0x00])
            .count()
    };
    let xs: Vec<usize> = (0..w).filter(|&x| column(x) > 0).collect();
    let (left, right) = (column(xs[xs.len() / 10]), column(xs[xs.len() * 9 / 10]));
    assert!(
        right > 3 * left,
        "the leak's band at 10 %: {left} px, at 90 %: {right} px"
    );
}

#[test]
fn chromium_draws_the_svg_flamegraph_and_finds_the_leak_site() {
    assert_rendered_and_found("report.svg", "s");
}

#[test]
fn chromium_draws_the_html_report_and_its_search_box_finds_the_leak_site() {
    assert_rendered_and_found("report.html", "q");
    let (dom, _, _) = open("report.html", "q");
    // Self-contained: nothing loaded from elsewhere.
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(
            !dom.contains(external),
            "report.html refers outside: {external}"
        );
    }
}
