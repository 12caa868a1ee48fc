//! report.png: per-packet cost by case and scale (top), flood drop rate by variant (bottom).
//! Drawn with plotters' bitmap backend and Debian's DejaVu Sans (fonts-dejavu-core).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::{
    coord::Shift,
    prelude::*,
    style::{
        FontStyle, register_font,
        text_anchor::{HPos, Pos, VPos},
    },
};

use crate::{
    SCALES,
    cases::FLOOR,
    flood::Variant,
    report::{
        MAX_ABOVE_FLOOR_NS, MIN_GUARD_OVER_IPTABLES_RAW, MIN_GUARD_OVER_XDP_DROP, Report, thousands,
    },
};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_BOLD: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";
const SIZE: (u32, u32) = (1500, 1200);
const SCALE_COLORS: [RGBColor; 3] =
    [RGBColor(120, 170, 220), RGBColor(40, 110, 190), RGBColor(10, 50, 110)];
const GENERATED: RGBColor = RGBColor(60, 140, 80);
const DROPPED: RGBColor = RGBColor(160, 210, 160);
const TARGET: RGBColor = RGBColor(200, 40, 40);
const TARGET_2: RGBColor = RGBColor(230, 140, 20);

pub fn draw(report: &Report, path: &Path) -> Result<()> {
    fonts()?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(640);
    per_packet(report, &root, &top)?;
    flood(report, &root, &bottom)?;
    root.present()?;
    Ok(())
}

fn fonts() -> Result<()> {
    for (path, style) in [(FONT, FontStyle::Normal), (FONT_BOLD, FontStyle::Bold)] {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading {path}: apt-get install fonts-dejavu-core"))?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", style, bytes).map_err(|_| anyhow!("{path} is not a font"))?;
    }
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn per_packet(report: &Report, root: &Area, area: &Area) -> Result<()> {
    let cases = &report.per_packet;
    let floor_mid = report.case(FLOOR).and_then(|f| report.ns(f, 1)).unwrap_or(0.0);
    let max = cases
        .iter()
        .flat_map(|c| (0..SCALES.len()).filter_map(|s| report.ns(c, s)))
        .fold(floor_mid + MAX_ABOVE_FLOOR_NS, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Per-packet cost of each decision: BPF_PROG_TEST_RUN, ns/packet (median)",
            ("sans-serif", 28, FontStyle::Bold),
        )
        .margin(20)
        .margin_left(30)
        .x_label_area_size(70)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..cases.len() as f64, 0f64..max * 1.2)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ns per packet")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .draw()?;

    let width = 0.8 / SCALES.len() as f64;
    for (i, case) in cases.iter().enumerate() {
        let x0 = i as f64 + 0.1;
        for (s, color) in SCALE_COLORS.iter().enumerate() {
            let left = x0 + s as f64 * width;
            match report.ns(case, s) {
                Some(ns) => {
                    chart.draw_series([Rectangle::new(
                        [(left, 0.0), (left + width * 0.92, ns)],
                        color.filled(),
                    )])?;
                    chart.draw_series([Text::new(
                        format!("{ns:.0}"),
                        (left + width * 0.46, ns),
                        ("sans-serif", 16)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )])?;
                }
                None if s == 1 => {
                    chart.draw_series([Text::new(
                        "n/a",
                        (i as f64 + 0.5, max * 0.05),
                        ("sans-serif", 20)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )])?;
                }
                None => {}
            }
        }
        // The case's name under its group, in pixels of the whole image.
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            case.name.to_string(),
            (px, py + 12),
            ("sans-serif", 20).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }

    // The target: the floor (at the middle scale) plus the allowance.
    let target = floor_mid + MAX_ABOVE_FLOOR_NS;
    chart
        .draw_series(LineSeries::new(
            [(0.0, target), (cases.len() as f64, target)],
            TARGET.stroke_width(2),
        ))?
        .label(format!("target: floor + {MAX_ABOVE_FLOOR_NS:.0} ns"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TARGET.stroke_width(2)));
    for (s, containers) in SCALES.iter().enumerate() {
        chart
            .draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], SCALE_COLORS[s].filled())])?
            .label(format!("{} containers", thousands(*containers as u64)))
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 7), (x + 20, y + 7)], SCALE_COLORS[s].filled())
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn flood(report: &Report, root: &Area, area: &Area) -> Result<()> {
    let floods = &report.flood;
    let max = floods.iter().map(|f| f.mpps().max(f.dropped_mpps())).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "Flood drop rate on one core, generation included: Mpps ({} frames per flood)",
                thousands(u64::from(report.params.flood_repeat))
            ),
            ("sans-serif", 28, FontStyle::Bold),
        )
        .margin(20)
        .margin_left(30)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..floods.len() as f64, 0f64..max * 1.2)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("million packets per second")
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .draw()?;
    for (i, f) in floods.iter().enumerate() {
        for (k, (value, color)) in
            [(f.mpps(), GENERATED), (f.dropped_mpps(), DROPPED)].into_iter().enumerate()
        {
            let left = i as f64 + 0.15 + k as f64 * 0.35;
            chart.draw_series([Rectangle::new(
                [(left, 0.0), (left + 0.33, value)],
                color.filled(),
            )])?;
            chart.draw_series([Text::new(
                format!("{value:.2}"),
                (left + 0.165, value),
                ("sans-serif", 18)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )])?;
        }
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            f.variant.name().to_string(),
            (px, py + 12),
            ("sans-serif", 20).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    // guard's targets, as levels its bar must reach.
    let levels = [
        (Variant::XdpDropOnly, MIN_GUARD_OVER_XDP_DROP, TARGET),
        (Variant::IptablesRaw, MIN_GUARD_OVER_IPTABLES_RAW, TARGET_2),
    ];
    for (base, factor, color) in levels {
        let Some(base) = report.flood(base) else { continue };
        let level = base.mpps() * factor;
        chart
            .draw_series(LineSeries::new(
                [(0.0, level), (floods.len() as f64, level)],
                color.stroke_width(2),
            ))?
            .label(format!("target for guard: {factor} x {}", base.variant.name()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    for (label, color) in [
        ("frames generated / wall time", GENERATED),
        ("frames the receiver counted as dropped / wall time", DROPPED),
    ] {
        chart
            .draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], color.filled())])?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 7), (x + 20, y + 7)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
