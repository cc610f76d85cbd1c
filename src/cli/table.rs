//! Prints query results as arrow's pretty table (`+---+` borders, `| a |` rows) without
//! building the whole table in memory: arrow's `pretty_format_batches` makes a String per
//! cell and then one String of the table, many times the rows' own size (a result held
//! under `show`'s memory limit took 13 GB to print). Here the column widths are measured in
//! one pass and the rows are written in a second, one line at a time.
use std::io::Write;

use arrow::array::RecordBatch;
use arrow::error::ArrowError;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// A cell as printed: one line (a line break shows as `\n`, as arrow's table would wrap it).
fn cell_text(s: String) -> String {
    if s.contains(['\n', '\r']) {
        s.replace('\n', "\\n").replace('\r', "\\r")
    } else {
        s
    }
}

/// Writes `batches` as a table to `out`. Errors are arrow's (a value that cannot be
/// formatted) or the writer's (a closed pipe).
pub fn write_table(out: &mut dyn Write, batches: &[RecordBatch]) -> Result<(), ArrowError> {
    let Some(first) = batches.first() else {
        return writeln!(out, "++\n++").map_err(ArrowError::from);
    };
    let schema = first.schema();
    let options = FormatOptions::default().with_display_error(true);
    let mut widths: Vec<usize> = schema
        .fields()
        .iter()
        .map(|f| cell_text(f.name().clone()).chars().count())
        .collect();
    for b in batches {
        for (c, col) in b.columns().iter().enumerate() {
            let f = ArrayFormatter::try_new(col.as_ref(), &options)?;
            for r in 0..b.num_rows() {
                let w = cell_text(f.value(r).to_string()).chars().count();
                widths[c] = widths[c].max(w);
            }
        }
    }
    let rule: String = widths.iter().fold(String::from("+"), |mut s, w| {
        s.push_str(&"-".repeat(w + 2));
        s.push('+');
        s
    });
    let row = |cells: &mut dyn Iterator<Item = String>| -> String {
        let mut line = String::from("|");
        for (text, w) in cells.zip(&widths) {
            let pad = w - text.chars().count();
            line.push(' ');
            line.push_str(&text);
            line.push_str(&" ".repeat(pad + 1));
            line.push('|');
        }
        line
    };
    let io = |e: std::io::Error| ArrowError::from(e);
    writeln!(out, "{rule}").map_err(io)?;
    let header = row(&mut schema.fields().iter().map(|f| cell_text(f.name().clone())));
    writeln!(out, "{header}\n{rule}").map_err(io)?;
    for b in batches {
        let formatters = b
            .columns()
            .iter()
            .map(|col| ArrayFormatter::try_new(col.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        for r in 0..b.num_rows() {
            let line = row(&mut formatters.iter().map(|f| cell_text(f.value(r).to_string())));
            writeln!(out, "{line}").map_err(io)?;
        }
    }
    writeln!(out, "{rule}").map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn printed(batches: &[RecordBatch]) -> String {
        let mut out = Vec::new();
        write_table(&mut out, batches).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_table_is_arrows_pretty_table() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ticker", DataType::Utf8, true),
            Field::new("close", DataType::Float64, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = |t: Vec<Option<&str>>, c: Vec<Option<f64>>, n: Vec<i64>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(t)),
                    Arc::new(Float64Array::from(c)),
                    Arc::new(Int64Array::from(n)),
                ],
            )
            .unwrap()
        };
        let batches = vec![
            batch(
                vec![Some("AAPL"), None],
                vec![Some(1.5), Some(123456.789)],
                vec![1, -20],
            ),
            batch(vec![Some("Ä long name")], vec![None], vec![300]),
        ];
        let ours = printed(&batches);
        let arrows = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert_eq!(ours, format!("{arrows}\n"));
        assert_eq!(
            printed(&[]),
            format!(
                "{}\n",
                arrow::util::pretty::pretty_format_batches(&[]).unwrap()
            )
        );
    }

    #[test]
    fn line_breaks_stay_on_one_line() {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        let b =
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["a\nb"]))]).unwrap();
        assert_eq!(
            printed(&[b]),
            "+------+\n| s    |\n+------+\n| a\\nb |\n+------+\n"
        );
    }
}
