//! A workload's results: rows of (figure, samples, unit), summarised as median and min–max,
//! printed as a table and saved as JSON and Markdown.

use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
    /// The target, when there is one, as text (e.g. "<= 48").
    pub target: Option<String>,
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub workload: String,
    pub machine: String,
    /// When the workload ran (UTC, RFC 3339).
    pub date: String,
    pub notes: Vec<String>,
    pub figures: Vec<Figure>,
}

pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The p-th percentile (0..=100) of samples, nearest rank.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// A short description of this machine: cores, memory, CPU model.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {} GiB, {cpu}", mem / (1 << 20))
}

impl Report {
    pub fn new(workload: &str) -> Report {
        Report {
            workload: workload.into(),
            machine: machine(),
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            notes: Vec::new(),
            figures: Vec::new(),
        }
    }

    pub fn add(&mut self, name: &str, unit: &str, samples: Vec<f64>, target: Option<(&str, f64)>) {
        let m = median(&samples);
        let met = target.map(|(op, t)| match op {
            "<=" => m <= t,
            ">=" => m >= t,
            _ => false,
        });
        self.figures.push(Figure {
            name: name.into(),
            unit: unit.into(),
            median: m,
            min: samples.iter().copied().fold(f64::INFINITY, f64::min),
            max: samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            samples,
            target: target.map(|(op, t)| format!("{op} {t}")),
            met,
        });
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "### {}\n\nMachine: {}\n\nRun: {}\n\n",
            self.workload, self.machine, self.date
        );
        s += "| figure | median | min – max | unit | target | met |\n|---|---:|---:|---|---|---|\n";
        for f in &self.figures {
            s += &format!(
                "| {} | {} | {} – {} | {} | {} | {} |\n",
                f.name,
                fmt(f.median),
                fmt(f.min),
                fmt(f.max),
                f.unit,
                f.target.clone().unwrap_or_default(),
                match f.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                }
            );
        }
        for n in &self.notes {
            s += &format!("\n{n}\n");
        }
        s
    }

    pub fn print(&self) {
        println!("\n{}", self.markdown());
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join(format!("{}.json", self.workload)),
            serde_json::to_string_pretty(self)?,
        )?;
        std::fs::write(dir.join(format!("{}.md", self.workload)), self.markdown())?;
        Ok(())
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}
