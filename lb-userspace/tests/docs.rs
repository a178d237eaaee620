//! The configuration a reader copies must be valid: every YAML block of the
//! README that is an xdplb configuration (it has `vips:`), every example file
//! and the file the package installs pass the same validation as `xdplb check`.

use std::path::Path;

use lb_userspace::config;

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
    for (line, block) in configs {
        if let Err(errors) = config::parse("README.md", &block) {
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
    let mut files: Vec<_> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.push(root().join("packaging/xdplb.yaml"));
    assert!(files.len() >= 3);
    for f in files {
        if let Err(e) = config::load(&f) {
            panic!("{} is rejected:\n{e}", f.display());
        }
    }
}
