//! The overview's chart: refresh outcomes per hour over the last day, drawn server-side as SVG
//! with `plotters` (text is left to the browser's fonts).

use plotters::prelude::*;

/// Successful and failed refreshes in each of the last 24 hours, oldest first.
pub type Hours = [(i64, i64); 24];

/// Stacked bars (refreshed under failed) per hour, with a count axis and an hour axis; an empty
/// string when drawing fails (the table beside it says the same).
pub fn hourly(hours: &Hours, (width, height): (u32, u32)) -> String {
    let mut svg = String::new();
    if draw(hours, (width, height), &mut svg).is_err() {
        return String::new();
    }
    svg
}

fn draw<'a>(
    hours: &Hours,
    size: (u32, u32),
    svg: &'a mut String,
) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    root.fill(&WHITE)?;
    let top = hours
        .iter()
        .map(|(ok, failed)| ok + failed)
        .max()
        .unwrap_or(0)
        .max(1);
    let mut chart = ChartBuilder::on(&root)
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(48)
        .build_cartesian_2d(0i32..24i32, 0i64..top + top / 10 + 1)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(235, 238, 243))
        .x_labels(7)
        .x_label_formatter(&|h| format!("{}h ago", 24 - h))
        .y_labels(5)
        .draw()?;
    let green = RGBColor(31, 122, 58);
    let red = RGBColor(180, 35, 24);
    chart.draw_series(hours.iter().enumerate().map(|(i, (ok, _))| {
        let x = i as i32;
        Rectangle::new([(x, 0), (x + 1, *ok)], green.filled())
    }))?;
    chart.draw_series(hours.iter().enumerate().map(|(i, (ok, failed))| {
        let x = i as i32;
        Rectangle::new([(x, *ok), (x + 1, ok + failed)], red.filled())
    }))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_is_an_svg_with_a_bar_per_hour_and_its_labels() {
        let mut hours = [(0, 0); 24];
        hours[23] = (40, 2);
        hours[0] = (3, 0);
        let svg = hourly(&hours, (640, 200));
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("<rect"), "{svg}");
        assert!(svg.contains("h ago"), "labels are text: {svg}");
    }
}
