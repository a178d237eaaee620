//! Figures, and their four renderings: the terminal table, bench/RESULTS.md,
//! target/bench/results.jsonl (one object per figure) and a PNG chart of the
//! end-to-end ratios.

use std::{collections::BTreeSet, fmt::Write as _, path::Path};

use plotters::prelude::*;
use serde_json::json;

#[derive(Clone, Debug)]
pub struct Figure {
    pub suite: String,
    pub case: String,
    pub imp: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
}

#[derive(Default)]
pub struct Report {
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn add(&mut self, suite: &str, case: &str, imp: &str, metric: &str, value: f64, unit: &str) {
        println!("  {suite:<9} {case:<34} {imp:<12} {metric:<32} {value:>12.2} {unit}");
        self.figures.push(Figure {
            suite: suite.into(),
            case: case.into(),
            imp: imp.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
        });
    }

    pub fn note(&mut self, text: impl Into<String>) {
        let t = text.into();
        println!("  note: {t}");
        self.notes.push(t);
    }

    pub fn get(&self, suite: &str, case: &str, imp: &str, metric: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.suite == suite && f.case == case && f.imp == imp && f.metric == metric)
            .map(|f| f.value)
    }

    pub fn jsonl(&self) -> String {
        self.figures
            .iter()
            .map(|f| {
                json!({"suite": f.suite, "case": f.case, "impl": f.imp, "metric": f.metric, "value": f.value, "unit": f.unit})
                    .to_string()
                    + "\n"
            })
            .collect()
    }

    /// One Markdown table per suite: a row per (case, impl), a column per metric.
    pub fn markdown(&self, header: &str) -> String {
        let mut o = String::from(header);
        let suites: Vec<String> = dedup(self.figures.iter().map(|f| f.suite.clone()));
        for suite in suites {
            let figs: Vec<&Figure> = self.figures.iter().filter(|f| f.suite == suite).collect();
            let metrics: Vec<(String, String)> = dedup(figs.iter().map(|f| (f.metric.clone(), f.unit.clone())));
            let rows: Vec<(String, String)> = dedup(figs.iter().map(|f| (f.case.clone(), f.imp.clone())));
            let _ = writeln!(o, "\n### {suite}\n");
            let _ = write!(o, "| case | impl |");
            for (m, u) in &metrics {
                let _ = write!(o, " {m} ({u}) |");
            }
            let _ = write!(o, "\n|---|---|");
            for _ in &metrics {
                let _ = write!(o, "---:|");
            }
            o.push('\n');
            for (case, imp) in rows {
                let _ = write!(o, "| {case} | {imp} |");
                for (m, _) in &metrics {
                    match figs.iter().find(|f| f.case == case && f.imp == imp && &f.metric == m) {
                        Some(f) => {
                            let _ = write!(o, " {} |", fmt_value(f.value, &f.unit));
                        }
                        None => o.push_str(" |"),
                    }
                }
                o.push('\n');
            }
        }
        if !self.notes.is_empty() {
            o.push_str("\n### Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(o, "- {n}");
            }
        }
        o
    }

    /// Bars of every `ratio_to_direct` figure, grouped by case.
    pub fn chart(&self, path: &Path) -> Result<(), String> {
        let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
            .map_err(|e| format!("no DejaVu font (apt package fonts-dejavu-core): {e}"))?;
        let font: &'static [u8] = Box::leak(font.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, font).map_err(|_| "bad font".to_string())?;
        let bars: Vec<&Figure> = self.figures.iter().filter(|f| f.metric == "ratio_to_direct").collect();
        if bars.is_empty() {
            return Ok(());
        }
        // Horizontal bars: one row per (case, path), labels on the left.
        let rows = bars.len();
        let root = BitMapBackend::new(path, (1100, 80 + 28 * rows as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let max = bars.iter().map(|b| b.value).fold(1.2, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("End to end, as a ratio to direct (higher is better)", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(280)
            .build_cartesian_2d(0.0..max, (0..rows).into_segmented())
            .map_err(|e| e.to_string())?;
        let labels: Vec<String> = bars.iter().map(|b| format!("{}: {}", b.case, b.imp)).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(rows)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if *i < rows => labels[rows - 1 - *i].clone(),
                _ => String::new(),
            })
            .y_label_style(("sans-serif", 14))
            .x_desc("ratio to direct")
            .draw()
            .map_err(|e| e.to_string())?;
        let colour = |imp: &str| match imp {
            i if i.starts_with("xdplb") => BLUE,
            "haproxy" => RED,
            "nftables" => GREEN,
            _ => BLACK,
        };
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                let row = rows - 1 - i;
                let mut bar = Rectangle::new(
                    [(0.0, SegmentValue::Exact(row)), (b.value, SegmentValue::Exact(row + 1))],
                    colour(&b.imp).mix(0.6).filled(),
                );
                bar.set_margin(3, 3, 0, 0);
                bar
            }))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn dedup<T: Ord + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = BTreeSet::new();
    items.filter(|i| seen.insert(i.clone())).collect()
}

/// Counts (flows, entries, packets) as whole numbers; other figures to
/// three significant digits or more.
fn fmt_value(v: f64, unit: &str) -> String {
    if v.abs() >= 1000.0 || matches!(unit, "flows" | "entries" | "packets") {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}
