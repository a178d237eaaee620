//! The configuration a reader copies must be valid: every YAML block of the
//! README that is an xdplb configuration (it has `vips:`), every example file
//! and the file the package installs pass the same validation as `xdplb check`.

use std::path::Path;

use lb_userspace::config;

/// Where the examples and the README keep `flow_sync`'s key, and the flow
/// hash seed (`hash_seed_file`): both stand for a secret file.
const EXAMPLE_KEY: &str = "/etc/xdplb/sync.key";
const EXAMPLE_SEED: &str = "/etc/xdplb/hash-seed.key";

/// A key of the right kind (0600, 32 bytes) standing in for the one an
/// operator keeps at `EXAMPLE_KEY`; removed when dropped.
struct ExampleKey(std::path::PathBuf);

impl ExampleKey {
    fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let path = std::env::temp_dir().join(format!("xdplb-docs-{tag}-{}.key", std::process::id()));
        std::fs::write(&path, "an example key of 32 characters\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self(path)
    }

    fn stand_in(&self, text: &str) -> String {
        let path = self.0.to_str().unwrap();
        text.replace(EXAMPLE_KEY, path).replace(EXAMPLE_SEED, path)
    }
}

impl Drop for ExampleKey {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The ```yaml blocks of a Markdown text, with the line each starts on.
fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```yaml") => current = Some((i + 2, String::new())),
            (Some(_), l) if l.starts_with("```") => blocks.push(current.take().unwrap()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn every_configuration_in_the_readme_passes_check() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let configs: Vec<(usize, String)> = yaml_blocks(&readme).into_iter().filter(|(_, b)| b.contains("vips:")).collect();
    assert!(configs.len() >= 3, "the README's configuration blocks were not found");
    let mut failures = Vec::new();
    let key = ExampleKey::new("readme");
    for (line, block) in configs {
        if let Err(errors) = config::parse("README.md", &key.stand_in(&block)) {
            // Positions in the README itself, so the message points at the line to fix.
            failures.extend(
                errors
                    .0
                    .iter()
                    .map(|e| format!("README.md:{}:{}: {}: {}", line + e.pos.line - 1, e.pos.col, e.field, e.message)),
            );
        }
    }
    assert!(failures.is_empty(), "README configurations that `xdplb check` rejects:\n{}", failures.join("\n"));
}

#[test]
fn every_example_file_passes_check() {
    // examples/ and one level below (examples/keepalived/).
    let mut files: Vec<_> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .flat_map(
            |p| if p.is_dir() { std::fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect() } else { vec![p] },
        )
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.push(root().join("packaging/xdplb.yaml"));
    assert!(files.len() >= 3);
    let key = ExampleKey::new("examples");
    for f in files {
        let text = key.stand_in(&std::fs::read_to_string(&f).unwrap());
        if let Err(e) = config::parse(&f.display().to_string(), &text) {
            panic!("{} is rejected:\n{e}", f.display());
        }
    }
}
