//! The windows table on stdout, like the reference's console sink: at every trigger, the
//! windows that changed since the previous one, final ones marked, times in UTC.

use super::state::WindowRow;
use super::task::{decimal, rfc3339};
use std::io::Write;

/// Prints the table.
#[derive(Debug, Clone, Copy)]
pub struct Console {
    pub window_secs: i64,
    pub minor_digits: u8,
}

/// "2025-09-02 10:30:00".
fn utc(secs: i64) -> String {
    rfc3339(secs)
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

impl Console {
    /// The table for `rows` (in the order given) as text.
    pub fn render<'r>(
        &self,
        now: i64,
        global_watermark: Option<i64>,
        rows: impl Iterator<Item = &'r WindowRow>,
    ) -> String {
        let scale = 10i64.pow(self.minor_digits as u32);
        let header = [
            "store",
            "total_revenue_int",
            "window_start",
            "window_end",
            "total",
            "events",
            "final",
        ];
        let mut cells: Vec<[String; 7]> = rows
            .map(|r| {
                [
                    r.store.clone(),
                    (r.total_minor / scale).to_string(),
                    utc(r.window_start),
                    utc(r.window_start + self.window_secs),
                    decimal(r.total_minor, self.minor_digits),
                    r.events.to_string(),
                    if r.final_ { "final" } else { "" }.to_string(),
                ]
            })
            .collect();
        cells.sort_by(|a, b| (&a[2], &a[0]).cmp(&(&b[2], &b[0])));
        let mut widths = header.map(str::len);
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |row: &[String]| {
            let mut s = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join(" | ");
            s.truncate(s.trim_end().len());
            s.push('\n');
            s
        };
        let finals = cells.iter().filter(|c| !c[6].is_empty()).count();
        let mut out = format!(
            "Trigger at {} UTC; watermark {}; {} window(s) changed, {} final\n",
            utc(now),
            global_watermark.map_or("-".to_string(), |w| format!("{} UTC", utc(w))),
            cells.len(),
            finals
        );
        out.push_str(&line(&header.map(String::from)));
        let total: usize = widths.iter().sum::<usize>() + 3 * (widths.len() - 1);
        out.push_str(&"-".repeat(total));
        out.push('\n');
        for row in &cells {
            out.push_str(&line(row));
        }
        out
    }

    pub fn print<'r>(
        &self,
        now: i64,
        global_watermark: Option<i64>,
        rows: impl Iterator<Item = &'r WindowRow>,
    ) {
        let text = self.render(now, global_watermark, rows);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_reads_like_the_reference() {
        let rows = [
            WindowRow {
                store: "store-2".into(),
                window_start: 1_756_809_030,
                total_minor: 1050,
                events: 2,
                final_: false,
            },
            WindowRow {
                store: "store-1".into(),
                window_start: 1_756_809_000,
                total_minor: 28740,
                events: 12,
                final_: true,
            },
        ];
        let c = Console {
            window_secs: 30,
            minor_digits: 2,
        };
        let t = c.render(1_756_809_070, Some(1_756_809_030), rows.iter());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "Trigger at 2025-09-02 10:31:10 UTC; watermark 2025-09-02 10:30:30 UTC; 2 window(s) changed, 1 final"
        );
        assert!(lines[1].starts_with("store   | total_revenue_int | window_start"));
        assert_eq!(
            lines[3],
            "store-1 | 287               | 2025-09-02 10:30:00 | 2025-09-02 10:30:30 | 287.40 | 12     | final"
        );
        assert!(lines[4].starts_with("store-2 | 10                | 2025-09-02 10:30:30"));
    }
}
