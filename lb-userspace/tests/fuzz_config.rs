//! The configuration loader under fuzzing: generated, hostile and mutated
//! YAML fed to `config::parse`. Whatever the text, the answer is `Ok` or
//! errors that each name a line and column inside the file, a field and a
//! message; never a panic, never longer than a few seconds (a hang guard,
//! not a performance threshold) and never memory out of proportion to the
//! text (YAML aliases could expand a small file exponentially).
//!
//! `cargo test` runs a bounded pass (a fixed seed, the hostile shapes, the
//! examples and tests/fuzz/config with every key's value swapped for a
//! mapping, a list and a scalar); `cargo xtask fuzz --time N` runs random
//! seeds for N seconds (`long_run` below) and saves failing inputs under
//! tests/fuzz/found/.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use lb_userspace::config;

/// Counts what each thread has allocated and not freed, and its peak: a
/// case runs on a thread of its own, so its peak is the case's.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // try_with: allocations during thread teardown are not counted.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counters are thread-local cells that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A case's time limit: far beyond any real file (the largest allowed
/// parses in well under a second); only a hang or a blow-up reaches it.
const CASE_TIME: Duration = Duration::from_secs(5);
const BOUNDED_SEED: u64 = 0xc0f1_6000;
const BOUNDED_CASES: usize = 3000;
/// Generated texts stay below this (the hostile shapes go up to the loader's
/// own 32 MiB limit).
const MAX_GENERATED: usize = 256 << 10;

/// Memory a case may use: linear in its text. A tree node and an error
/// message per few bytes of text is the worst a non-expanding parser does.
fn memory_limit(text_len: usize) -> isize {
    (512 * text_len + (32 << 20)) as isize
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz")
}

type Rng = lb_common::seeded::SeededRng;

// ---------------------------------------------------------------- the check

/// Parses `text` on a thread of its own and checks the answer; the error
/// says what went wrong.
fn check(text: String) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let len = text.len();
    // YAML breaks lines at \n, \r\n and a lone \r.
    let lines = 1 + text.matches('\n').count() + text.matches('\r').count() - text.matches("\r\n").count();
    std::thread::Builder::new()
        .name("parse".into())
        .spawn(move || {
            let result = std::panic::catch_unwind(|| config::parse("fuzz.yaml", &text));
            drop(text);
            let peak = PEAK.with(Cell::get);
            let _ = tx.send((result.map_err(|p| panic_message(&*p)), peak));
        })
        .expect("a thread for the case");
    let (result, peak) = match rx.recv_timeout(CASE_TIME) {
        Ok(r) => r,
        // The thread goes on; the test fails and its process ends it.
        Err(_) => return Err(format!("no answer within {CASE_TIME:?} (a hang)")),
    };
    if peak > memory_limit(len) {
        return Err(format!("{peak} bytes allocated for a {len}-byte text"));
    }
    let errors = match result.map_err(|m| format!("panicked: {m}"))? {
        Ok(_) => return Ok(()),
        Err(config::ConfigErrors(errors)) => errors,
    };
    if errors.is_empty() {
        return Err("Err without any error".into());
    }
    for e in &errors {
        let shown = e.to_string();
        if e.pos.line < 1 || e.pos.col < 1 || e.pos.line > lines + 1 {
            return Err(format!("an error outside the file's {lines} lines: {shown}"));
        }
        // The field may be empty: the key `""` is named as it is written.
        if e.file != "fuzz.yaml" || e.message.trim().is_empty() {
            return Err(format!("an error without file or message: {shown:?}"));
        }
    }
    Ok(())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

// ---------------------------------------------------------------- inputs

/// The examples and the committed seeds: real configurations to mutate.
fn seeds() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut paths = vec![root.join("packaging/xdplb.yaml")];
    for dir in [root.join("examples"), fuzz_dir().join("config")] {
        let mut more: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        more.sort();
        paths.extend(more);
    }
    paths
        .into_iter()
        .map(|p| {
            let text = String::from_utf8_lossy(&std::fs::read(&p).expect("a seed file")).into_owned();
            (p.display().to_string(), text)
        })
        .collect()
}

const KEYS: &[&str] = &[
    "interface",
    "backend_interface",
    "xdp_mode",
    "metrics_listen",
    "ipip_source_v4",
    "ipip_source_v6",
    "conntrack_size",
    "conntrack_udp_idle",
    "conntrack_flood_rate",
    "hash_seed_file",
    "nat",
    "resolvers",
    "bgp",
    "flow_sync",
    "vips",
    "name",
    "address",
    "port",
    "protocol",
    "forwarding",
    "hash",
    "table_size",
    "backends",
    "health_check",
    "on_all_down",
    "sorry_server",
    "icmp_echo",
    "weight",
    "type",
    "path",
    "host",
    "expect_status",
    "expect_body",
    "sni",
    "ca_file",
    "send",
    "expect",
    "send_hex",
    "expect_hex",
    "command",
    "interval",
    "timeout",
    "rise",
    "fall",
    "source",
    "initial_state",
    "nameservers",
    "hold_obsolete",
    "tcp_timeout",
    "udp_timeout",
    "closed_timeout",
    "routes_file",
    "bird_socket",
    "warmup",
    "withdraw_wait",
    "listen",
    "peers",
    "key_file",
    "refresh",
    "max_rate",
];

const SCALARS: &[&str] = &[
    "",
    "~",
    "null",
    "0",
    "1",
    "-1",
    "80",
    "65535",
    "65536",
    "4294967296",
    "99999999999999999999999",
    "1.5",
    "1e308",
    "nan",
    ".inf",
    "0x50",
    "yes",
    "true",
    "false",
    "tcp",
    "udp",
    "dsr",
    "ipip",
    "nat",
    "five-tuple",
    "source-ip",
    "drop",
    "pass",
    "sorry_server",
    "http",
    "https",
    "exec",
    "none",
    "up",
    "down",
    "auto",
    "driver",
    "skb",
    "500ms",
    "2s",
    "1m",
    "0s",
    "1.5s",
    "25h",
    "-3s",
    "198.18.0.10",
    "198.18.0.10:80",
    "2001:db8::10",
    "[2001:db8::10]:7946",
    "0.0.0.0",
    "255.255.255.255",
    "127.0.0.1",
    "::ffff:1.2.3.4",
    "198.18.0.0/16",
    "2001:db8::/64",
    "2001:db8::/129",
    "eth0",
    "a-very-long-interface-name",
    "/dev/null",
    "/nonexistent/file",
    "relative/path",
    "200-399",
    "399-200",
    "0d0a",
    "0d0",
    "GET / HTTP/1.1",
    "web.example.",
    "'quoted: value'",
    "\"double \\u00e9 \\x41\"",
    "\"unterminated",
    "|\n  literal\n  text",
    ">-\n  folded",
    "!!binary aGVsbG8=",
    "!custom tagged",
    "!<tag:yaml.org,2002:str> 1",
    "&anchor 1",
    "*anchor",
    "[]",
    "{}",
    "[a, b]",
    "{a: b}",
    "- item",
    "? complex",
    "<<: *anchor",
    "é漢字🙂",
    "\u{feff}bom",
    "\t",
    "%YAML 1.2",
    "---",
    "...",
    "#comment",
    "@reserved",
    "`reserved",
];

/// A random tree of known keys (mostly) and wrong-or-right values, in block
/// or flow style.
fn tree(rng: &Rng, depth: usize, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    let shape = if depth >= 6 { 2 } else { rng.below(3) };
    match shape {
        0 => {
            for _ in 0..rng.range(1, 5) {
                let key =
                    if rng.chance(90) { rng.pick(KEYS).to_string() } else { rng.pick(SCALARS).replace('\n', " ") };
                out.push_str(&format!("{pad}{key}:"));
                value(rng, depth, indent + 2, out);
            }
        }
        1 => {
            for _ in 0..rng.range(0, 4) {
                out.push_str(&format!("{pad}-"));
                value(rng, depth, indent + 2, out);
            }
            if out.ends_with(':') {
                out.push_str(" []\n");
            }
        }
        _ => {
            out.push_str(&pad);
            out.push_str(rng.pick(SCALARS));
            out.push('\n');
        }
    }
}

fn value(rng: &Rng, depth: usize, indent: usize, out: &mut String) {
    match rng.below(5) {
        0 | 1 => {
            out.push('\n');
            tree(rng, depth + 1, indent, out);
        }
        2 => {
            out.push(' ');
            out.push_str(&flow(rng, depth + 1));
            out.push('\n');
        }
        _ => {
            out.push(' ');
            out.push_str(&rng.pick(SCALARS).replace('\n', &format!("\n{}", " ".repeat(indent))));
            out.push('\n');
        }
    }
}

fn flow(rng: &Rng, depth: usize) -> String {
    match if depth >= 6 { 2 } else { rng.below(3) } {
        0 => {
            let items: Vec<String> = (0..rng.below(4)).map(|_| flow(rng, depth + 1)).collect();
            format!("[{}]", items.join(", "))
        }
        1 => {
            let items: Vec<String> =
                (0..rng.below(4)).map(|_| format!("{}: {}", rng.pick(KEYS), flow(rng, depth + 1))).collect();
            format!("{{{}}}", items.join(", "))
        }
        _ => {
            let s = rng.pick(SCALARS);
            if s.contains('\n') { "x".into() } else { s.to_string() }
        }
    }
}

const SPECIALS: &[&str] = &[
    ":", "-", " ", "\n", "\t", "[", "]", "{", "}", ",", "#", "&a", "*a", "!", "|", ">", "'", "\"", "%", "@", "`", "?",
    "---\n", "...\n", "\r", "\0", "\u{feff}", "\\", "<<: ", "é",
];

/// One mutation of a configuration's text.
fn mutate(rng: &Rng, text: &mut String) {
    let mut lines: Vec<String> = text.split('\n').map(String::from).collect();
    let n = lines.len();
    let i = rng.below(n);
    match rng.below(9) {
        0 => {
            let at = rng.below(lines[i].len() + 1);
            let at = (0..=at).rev().find(|&k| lines[i].is_char_boundary(k)).unwrap_or(0);
            lines[i].insert_str(at, rng.pick(SPECIALS));
        }
        1 => {
            let keep: String = lines[i].chars().take(rng.below(lines[i].chars().count() + 1)).collect();
            lines[i] = keep;
        }
        2 => {
            let line = lines[i].clone();
            lines.insert(i, line);
        }
        3 => {
            lines.remove(i);
        }
        4 => lines.swap(i, rng.below(n)),
        5 => {
            let indent = lines[i].len() - lines[i].trim_start().len();
            let trimmed = lines[i].trim_start().to_string();
            let new = match rng.below(3) {
                0 => indent + rng.range(1, 4),
                1 => indent.saturating_sub(rng.range(1, 4)),
                _ => 0,
            };
            lines[i] = format!("{}{}{trimmed}", " ".repeat(new), if rng.chance(10) { "\t" } else { "" });
        }
        6 => swap_value(rng, &mut lines[i]),
        7 => {
            let mut t = String::new();
            tree(rng, 3, lines[i].len() - lines[i].trim_start().len(), &mut t);
            lines.insert(i, t.trim_end().to_string());
        }
        _ => lines.truncate(rng.below(n + 1)),
    }
    *text = lines.join("\n");
}

/// The value of a `key: value` line swapped for another shape.
fn swap_value(rng: &Rng, line: &mut String) {
    if let Some(colon) = line.find(": ").or_else(|| line.ends_with(':').then(|| line.len() - 1)) {
        let indent = line.len() - line.trim_start().len() + 2;
        let pad = " ".repeat(indent);
        let shape = match rng.below(6) {
            0 => "[1, 2]".to_string(),
            1 => "{a: b}".to_string(),
            2 => format!("\n{pad}- x\n{pad}- y"),
            3 => format!("\n{pad}k: v"),
            4 => rng.pick(SCALARS).replace('\n', &format!("\n{pad}")),
            _ => String::new(),
        };
        line.truncate(colon);
        line.push_str(": ");
        line.push_str(&shape);
    }
}

/// Random bytes, some of them invalid UTF-8, read as the loader would not:
/// lossily (the loader itself reads UTF-8 only).
fn random_text(rng: &Rng) -> String {
    let alphabet = b"ab:- \n[]{},#&*!|>'\"?%@\t";
    let bytes: Vec<u8> = (0..rng.below(400))
        .map(|_| if rng.chance(70) { alphabet[rng.below(alphabet.len())] } else { rng.next() as u8 })
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn generate(rng: &Rng, seeds: &[(String, String)]) -> String {
    let mut text = match rng.below(10) {
        0 => random_text(rng),
        1..=3 => {
            let mut t = String::new();
            tree(rng, 0, 0, &mut t);
            t
        }
        _ => seeds[rng.below(seeds.len())].1.clone(),
    };
    for _ in 0..rng.range(1, 6) {
        mutate(rng, &mut text);
    }
    let mut cut = text.len().min(MAX_GENERATED);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text
}

/// Shapes made to hurt a YAML loader, each a few MiB at most (the loader's
/// own limit, 32 MiB, with `big`).
fn hostile(big: bool) -> Vec<(String, String)> {
    // The bounded pass stays at a few seconds (a debug build); the long run
    // takes each shape further.
    let scale = if big { 10 } else { 1 };
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, text: String| out.push((name.to_string(), text));
    // Billion laughs: nine levels of ten aliases each.
    let mut laughs = String::from("a0: &a0 [\"lol\"]\n");
    for i in 1..10 {
        let refs: Vec<String> = (0..10).map(|_| format!("*a{}", i - 1)).collect();
        laughs.push_str(&format!("a{i}: &a{i} [{}]\n", refs.join(", ")));
    }
    add("billion laughs", laughs.clone());
    add("billion laughs under vips", format!("vips: *a9\n{laughs}"));
    add("an alias as a key", "a: &k x\n*k : 1\nvips: []\n".into());
    add("merge keys", "base: &b {port: 80}\nvips:\n  - <<: *b\n    name: x\n".into());
    add("an undefined alias", "vips: *nowhere\n".into());
    for n in [100, 10_000, 20_000 * scale] {
        add(&format!("{n} nested block lists"), "- ".repeat(n) + "x\n");
        add(&format!("{n} nested flow lists"), "[".repeat(n) + &"]".repeat(n));
        add(&format!("{n} nested flow maps"), "{a: ".repeat(n) + &"}".repeat(n));
        let mut maps = String::new();
        for d in 0..n.min(5000) {
            maps.push_str(&" ".repeat(d));
            maps.push_str("a:\n");
        }
        add(&format!("{n} nested block maps"), maps);
    }
    let mib = scale << 20;
    add("a large scalar", format!("interface: {}\nvips: []\n", "x".repeat(mib)));
    add("a large quoted scalar", format!("interface: \"{}\"\nvips: []\n", "\\t".repeat(mib / 2)));
    add("a large key", format!("{}: 1\n", "k".repeat(mib)));
    add("a large comment", format!("#{}\nvips: []\n", "c".repeat(mib)));
    let n = 20_000 * scale;
    add("many keys", (0..n).map(|i| format!("k{i}: {i}\n")).collect());
    add("many flow keys", format!("{{{}}}", (0..n).map(|i| format!("k{i}: 1")).collect::<Vec<_>>().join(",")));
    add("many list items", format!("vips:\n{}", "  - 1\n".repeat(n)));
    add("a long line", format!("vips: [{}]\n", "1, ".repeat(n)));
    add(
        "many VIPs",
        format!(
            "vips:\n{}",
            (0..2_000 * scale)
                .map(|i| format!(
                    "  - name: v{i}\n    address: 198.18.{}.{}\n    port: 80\n    backends: [{{address: 198.19.0.1}}]\n",
                    i / 250,
                    i % 250 + 1
                ))
                .collect::<String>()
        ),
    );
    add(
        "one VIP with many backends",
        format!(
            "vips:\n  - name: v\n    address: 198.18.0.1\n    port: 80\n    backends:\n{}",
            // Enough that a pairwise duplicate check (quadratic) would hang,
            // not scaled: 600,000 parse linearly but slower than the hang guard
            // in a debug build.
            (0..60_000).map(|i| format!("      - address: 198.19.{}.{}\n", i / 250, i % 250 + 1)).collect::<String>()
        ),
    );
    add(
        "one VIP with many named backends",
        format!(
            "vips:\n  - name: v\n    address: 198.18.0.1\n    port: 80\n    backends:\n{}",
            (0..60_000).map(|i| format!("      - address: b{i}.example.\n")).collect::<String>()
        ),
    );
    add("three documents", "vips: []\n---\nvips: []\n---\nvips: []\n".into());
    add("a document end, then text", "vips: []\n...\nvips: [1]\n".into());
    add("directives", "%YAML 1.2\n%TAG ! tag:example.com,2000:\n---\nvips: []\n".into());
    add("tags", "vips: !!seq []\ninterface: !!str eth0\nconntrack_size: !!int 4096\nx: !local y\n".into());
    add("a verbatim tag", "vips: !<tag:yaml.org,2002:seq> []\n".into());
    add("complex keys", "? [a, b]\n: 1\n? {a: 1}\n: 2\nvips: []\n".into());
    add("a byte-order mark", "\u{feff}vips: []\n".into());
    add("NUL and controls", "vips: []\ninterface: \"a\0b\"\n\u{1}: \u{7f}\n".into());
    add("CRLF", "vips: []\r\ninterface: eth0\r\n".into());
    add("tabs", "vips:\n\t- name: x\n".into());
    add("invalid UTF-8 read lossily", String::from_utf8_lossy(b"vips: []\ninterface: \xff\xfe\xc3\x28\n").into_owned());
    add("an unterminated quote", "vips: []\ninterface: \"eth0\n".into());
    add("only a comment", "# nothing\n".into());
    add("empty", String::new());
    add("only spaces", "   \n\n  \n".into());
    if big {
        // At the loader's limit, and one byte over.
        let limit = 32 << 20;
        let head = "vips: []\ninterface: ";
        add("a scalar up to 32 MiB", format!("{head}{}", "x".repeat(limit - head.len())));
        add("one byte over 32 MiB", format!("{head}{}", "x".repeat(limit + 1 - head.len())));
    }
    out
}

// ---------------------------------------------------------------- running

/// Every `key: value` line of every seed with its value swapped for each
/// other shape: every known key, with each wrong type.
fn wrong_types(seeds: &[(String, String)]) -> Vec<(String, String)> {
    let shapes = ["[1, 2]", "{a: b}", "\n  - x", "\n  k: v", "x", ""];
    let mut out = Vec::new();
    for (name, text) in seeds {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(colon) = line.find(':') else { continue };
            if line.trim_start().starts_with('#') {
                continue;
            }
            let indent = line.len() - line.trim_start().len();
            for shape in shapes {
                let shape = shape.replace("\n  ", &format!("\n{}", " ".repeat(indent + 2)));
                let mut l = lines.clone();
                let swapped = format!("{}: {shape}", &line[..colon]);
                l[i] = &swapped;
                out.push((format!("{name}:{}: `{}` as `{shape}`", i + 1, line.trim()), l.join("\n")));
            }
        }
    }
    out
}

struct Failure {
    what: String,
    text: String,
    error: String,
}

fn report(failures: &[Failure], save: bool) {
    for f in failures {
        let preview: String = f.text.chars().take(300).collect();
        println!(
            "FAILURE {}: {}\n--- input ({} bytes; first 300 chars) ---\n{preview}\n---",
            f.what,
            f.error,
            f.text.len()
        );
        if save {
            let dir = fuzz_dir().join("found");
            std::fs::create_dir_all(&dir).expect("tests/fuzz/found can be created");
            let name: String =
                f.what.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(60).collect();
            let path = dir.join(format!("config-{name}.yaml"));
            std::fs::write(&path, &f.text).expect("a found input can be saved");
            println!("saved {}", path.display());
        }
    }
    assert!(failures.is_empty(), "{} inputs broke the loader's contract (see above)", failures.len());
}

fn run_all(cases: impl IntoIterator<Item = (String, String)>, failures: &mut Vec<Failure>) -> usize {
    let mut n = 0;
    for (what, text) in cases {
        n += 1;
        if let Err(error) = check(text.clone()) {
            failures.push(Failure { what, text, error });
        }
    }
    n
}

/// `cases` generated texts from `seed`.
fn batch(seed: u64, cases: usize, seeds: &[(String, String)], failures: &mut Vec<Failure>) {
    let rng = Rng::new(seed);
    let texts = (0..cases).map(|i| (format!("seed {seed:#x} case {i}"), generate(&rng, seeds)));
    run_all(texts, failures);
}

#[test]
fn bounded_pass() {
    let started = Instant::now();
    let seeds = seeds();
    let mut failures = Vec::new();
    batch(BOUNDED_SEED, BOUNDED_CASES, &seeds, &mut failures);
    println!("{BOUNDED_CASES} generated cases: {:?}", started.elapsed());
    report(&failures, false);
}

#[test]
fn seeds_and_every_key_with_wrong_types() {
    let seeds = seeds();
    assert!(seeds.len() >= 8, "the examples, packaging/xdplb.yaml and tests/fuzz/config");
    let mut failures = Vec::new();
    run_all(seeds.clone(), &mut failures);
    let n = run_all(wrong_types(&seeds), &mut failures);
    println!("{n} wrong-type cases");
    report(&failures, false);
}

#[test]
fn hostile_shapes() {
    let mut failures = Vec::new();
    for (what, text) in hostile(false) {
        let started = Instant::now();
        if let Err(error) = check(text.clone()) {
            failures.push(Failure { what: what.clone(), text, error });
        }
        println!("{what}: {:?}", started.elapsed());
    }
    report(&failures, false);
}

/// Aliases are refused where they appear, so the billion laughs never expand.
#[test]
fn aliases_are_refused_before_they_expand() {
    let laughs = &hostile(false)[0].1;
    let err = config::parse("f", laughs).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(err.0[0].message.contains("aliases are not supported"), "{err}");
    assert_eq!(err.0[0].pos.line, 2, "{err}");
}

/// `cargo xtask fuzz --time N`: random seeds for N seconds
/// (XDPLB_FUZZ_TIME), or one batch again (XDPLB_FUZZ_SEED), then the
/// hostile shapes at full size.
#[test]
#[ignore = "long: run with cargo xtask fuzz"]
fn long_run() {
    let secs: u64 = std::env::var("XDPLB_FUZZ_TIME").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let replay = std::env::var("XDPLB_FUZZ_SEED")
        .ok()
        .map(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("XDPLB_FUZZ_SEED is a hex seed"));
    let seeds = seeds();
    let mut failures = Vec::new();
    if let Some(seed) = replay {
        batch(seed, BOUNDED_CASES, &seeds, &mut failures);
        return report(&failures, false);
    }
    run_all(hostile(true), &mut failures);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let seed_source = Rng::new(nanos ^ u64::from(std::process::id()));
    let mut batches = 0;
    while Instant::now() < deadline && failures.is_empty() {
        let seed = seed_source.next();
        println!("config: seed {seed:#x}");
        batch(seed, BOUNDED_CASES, &seeds, &mut failures);
        batches += 1;
    }
    println!("config: {batches} batches of {BOUNDED_CASES}");
    report(&failures, true);
}
