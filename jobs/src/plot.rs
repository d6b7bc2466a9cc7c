//! A small raster plotting module for the jobs' figures, producing PNG bytes with no
//! system fonts and no native libraries.
//!
//! A [`Figure`] is a grid of [`Panel`]s of equal size. Each panel has data ranges for its
//! axes (set them, or they are fitted to what the panel draws), a title, tick labels, and
//! a legend, all drawn with a built-in 5×7 bitmap font (printable ASCII). A panel draws, in
//! the order they were added: heatmaps ([`Panel::heatmap`] of a [`Grid`] through a
//! [`Colormap`]), bars and histograms ([`Panel::bars`], [`Panel::histogram`]), lines
//! ([`Panel::line`]) and scatter points ([`Panel::scatter`]). [`Figure::to_png`] renders
//! the figure and encodes it as an 8-bit RGB PNG.
//!
//! ```
//! use trainyard_jobs::plot::{Color, Colormap, Figure, Grid};
//!
//! let mut fig = Figure::new(1, 2, 240, 200);
//! let grid = Grid::from_fn(32, 32, (-2.0, 2.0), (-2.0, 2.0), |x, y| (-(x * x + y * y)).exp());
//! fig.panel(0, 0)?
//!     .title("density")
//!     .heatmap(&grid, Colormap::Viridis);
//! fig.panel(0, 1)?
//!     .title("samples")
//!     .x_range(-2.0, 2.0)
//!     .y_range(-2.0, 2.0)
//!     .scatter(&[(0.0, 0.0), (1.0, 0.5)], Color::RED, 2.0)
//!     .legend("data", Color::RED);
//! let png = fig.to_png()?;
//! assert_eq!(&png[1..4], b"PNG");
//! # Ok::<(), trainyard_jobs::plot::PlotError>(())
//! ```

/// Errors of building or encoding a figure.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// A panel index outside the figure's grid.
    #[error("no panel at row {row}, column {col} in a {rows}x{cols} figure")]
    NoSuchPanel {
        /// Requested row.
        row: usize,
        /// Requested column.
        col: usize,
        /// Rows of the figure.
        rows: usize,
        /// Columns of the figure.
        cols: usize,
    },
    /// The figure has no pixels (a zero dimension) or is too large to encode.
    #[error("figure size {width}x{height} is not drawable")]
    BadSize {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
    },
    /// A grid's values do not match its dimensions.
    #[error("grid of {nx}x{ny} cells needs {} values, got {len}", nx * ny)]
    BadGrid {
        /// Cells along x.
        nx: usize,
        /// Cells along y.
        ny: usize,
        /// Values given.
        len: usize,
    },
    /// The PNG encoder failed.
    #[error("PNG encoding failed: {0}")]
    Encode(#[from] png::EncodingError),
}

/// An opaque RGB color.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Color(pub u8, pub u8, pub u8);

impl Color {
    /// Black.
    pub const BLACK: Color = Color(0, 0, 0);
    /// White (the background).
    pub const WHITE: Color = Color(255, 255, 255);
    /// Mid gray (axes frames).
    pub const GRAY: Color = Color(128, 128, 128);
    /// Light gray.
    pub const LIGHT_GRAY: Color = Color(210, 210, 210);
    /// Red.
    pub const RED: Color = Color(214, 39, 40);
    /// Blue.
    pub const BLUE: Color = Color(31, 119, 180);
    /// Green.
    pub const GREEN: Color = Color(44, 160, 44);
    /// Orange.
    pub const ORANGE: Color = Color(255, 127, 14);
    /// Purple.
    pub const PURPLE: Color = Color(148, 103, 189);

    /// A color from its red, green and blue components.
    pub const fn rgb(r: u8, g: u8, b: u8) -> Color {
        Color(r, g, b)
    }

    /// Linear interpolation from `self` (at 0) to `other` (at 1).
    pub fn lerp(self, other: Color, t: f64) -> Color {
        let t = t.clamp(0.0, 1.0);
        let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
        Color(
            mix(self.0, other.0),
            mix(self.1, other.1),
            mix(self.2, other.2),
        )
    }
}

/// Maps a value in `[0, 1]` to a color.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colormap {
    /// Perceptually uniform dark purple → blue → green → yellow (matplotlib's default),
    /// interpolated between nine of its colors.
    Viridis,
    /// Black to white.
    Grays,
}

const VIRIDIS: [Color; 9] = [
    Color(0x44, 0x01, 0x54),
    Color(0x47, 0x2d, 0x7b),
    Color(0x3b, 0x52, 0x8b),
    Color(0x2c, 0x72, 0x8e),
    Color(0x21, 0x91, 0x8c),
    Color(0x28, 0xae, 0x80),
    Color(0x5e, 0xc9, 0x62),
    Color(0xad, 0xdc, 0x30),
    Color(0xfd, 0xe7, 0x25),
];

impl Colormap {
    /// The color of `t` (clamped to `[0, 1]`; NaN maps to 0).
    pub fn map(self, t: f64) -> Color {
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        match self {
            Colormap::Grays => Color::BLACK.lerp(Color::WHITE, t),
            Colormap::Viridis => {
                let x = t * (VIRIDIS.len() - 1) as f64;
                let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
                VIRIDIS[i].lerp(VIRIDIS[i + 1], x - i as f64)
            }
        }
    }
}

/// Values on a regular grid of `nx × ny` cells covering `x` × `y` in data coordinates,
/// row by row from the bottom (`values[j * nx + i]` is cell `i` along x, `j` along y).
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    nx: usize,
    ny: usize,
    x: (f64, f64),
    y: (f64, f64),
    values: Vec<f64>,
}

impl Grid {
    /// A grid from its values (see the type's docs for their order).
    pub fn new(
        nx: usize,
        ny: usize,
        x: (f64, f64),
        y: (f64, f64),
        values: Vec<f64>,
    ) -> Result<Grid, PlotError> {
        if nx == 0 || ny == 0 || values.len() != nx * ny {
            return Err(PlotError::BadGrid {
                nx,
                ny,
                len: values.len(),
            });
        }
        Ok(Grid {
            nx,
            ny,
            x,
            y,
            values,
        })
    }

    /// A grid whose cells hold `f` at their centers (at least one cell each way).
    pub fn from_fn(
        nx: usize,
        ny: usize,
        x: (f64, f64),
        y: (f64, f64),
        mut f: impl FnMut(f64, f64) -> f64,
    ) -> Grid {
        let (nx, ny) = (nx.max(1), ny.max(1));
        let centers = Grid::cell_centers(nx, ny, x, y);
        let values = centers.iter().map(|&(cx, cy)| f(cx, cy)).collect();
        Grid {
            nx,
            ny,
            x,
            y,
            values,
        }
    }

    /// The centers of `nx × ny` cells over `x` × `y`, in the order of a grid's values:
    /// evaluate a model there and pass the results to [`Grid::new`].
    pub fn cell_centers(nx: usize, ny: usize, x: (f64, f64), y: (f64, f64)) -> Vec<(f64, f64)> {
        let (dx, dy) = ((x.1 - x.0) / nx as f64, (y.1 - y.0) / ny as f64);
        (0..ny)
            .flat_map(|j| (0..nx).map(move |i| (i, j)))
            .map(|(i, j)| (x.0 + (i as f64 + 0.5) * dx, y.0 + (j as f64 + 0.5) * dy))
            .collect()
    }

    /// The grid's values, row by row from the bottom.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Smallest and largest finite value, if any.
    fn finite_range(&self) -> Option<(f64, f64)> {
        self.values
            .iter()
            .filter(|v| v.is_finite())
            .fold(None, |acc, &v| match acc {
                None => Some((v, v)),
                Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
            })
    }
}

#[derive(Debug, Clone)]
enum Item {
    Heatmap(Grid, Colormap),
    Bars {
        bars: Vec<(f64, f64)>,
        width: f64,
        color: Color,
    },
    Line {
        points: Vec<(f64, f64)>,
        color: Color,
        width: f64,
    },
    Scatter {
        points: Vec<(f64, f64)>,
        color: Color,
        radius: f64,
    },
}

/// One plot of a [`Figure`]: axes ranges, a title, drawn items and a legend. Every
/// builder method returns `&mut Self` so calls chain.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    title: String,
    x_range: Option<(f64, f64)>,
    y_range: Option<(f64, f64)>,
    items: Vec<Item>,
    legend: Vec<(String, Color)>,
}

impl Panel {
    /// Sets the title drawn above the plot area.
    pub fn title(&mut self, title: &str) -> &mut Self {
        self.title = title.to_string();
        self
    }

    /// Fixes the x axis to `[lo, hi]` (otherwise it is fitted to the items).
    pub fn x_range(&mut self, lo: f64, hi: f64) -> &mut Self {
        self.x_range = Some((lo, hi));
        self
    }

    /// Fixes the y axis to `[lo, hi]` (otherwise it is fitted to the items).
    pub fn y_range(&mut self, lo: f64, hi: f64) -> &mut Self {
        self.y_range = Some((lo, hi));
        self
    }

    /// Filled circles of `radius` pixels at `points` (data coordinates).
    pub fn scatter(&mut self, points: &[(f64, f64)], color: Color, radius: f64) -> &mut Self {
        self.items.push(Item::Scatter {
            points: points.to_vec(),
            color,
            radius,
        });
        self
    }

    /// A polyline through `points`, `width` pixels wide.
    pub fn line(&mut self, points: &[(f64, f64)], color: Color, width: f64) -> &mut Self {
        self.items.push(Item::Line {
            points: points.to_vec(),
            color,
            width,
        });
        self
    }

    /// The grid's cells colored through `colormap`, its finite values scaled from their
    /// minimum (0) to their maximum (1); non-finite cells are left blank.
    pub fn heatmap(&mut self, grid: &Grid, colormap: Colormap) -> &mut Self {
        self.items.push(Item::Heatmap(grid.clone(), colormap));
        self
    }

    /// Vertical bars from 0 to `height`, centred at `x`, each `width` wide (data units),
    /// given as `(x, height)` pairs.
    pub fn bars(&mut self, bars: &[(f64, f64)], width: f64, color: Color) -> &mut Self {
        self.items.push(Item::Bars {
            bars: bars.to_vec(),
            width,
            color,
        });
        self
    }

    /// A histogram of the finite `values` in `bins` equal bins between their minimum and
    /// maximum (counts as bar heights).
    pub fn histogram(&mut self, values: &[f64], bins: usize, color: Color) -> &mut Self {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let bins = bins.max(1);
        let (lo, hi) = finite
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if finite.is_empty() {
            return self;
        }
        let span = if hi > lo { hi - lo } else { 1.0 };
        let width = span / bins as f64;
        let mut counts = vec![0usize; bins];
        for v in &finite {
            let b = (((v - lo) / width) as usize).min(bins - 1);
            counts[b] += 1;
        }
        let bars: Vec<(f64, f64)> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| (lo + (i as f64 + 0.5) * width, c as f64))
            .collect();
        self.bars(&bars, width, color)
    }

    /// Adds a legend entry: a square of `color` and `label`, in the top-right corner.
    pub fn legend(&mut self, label: &str, color: Color) -> &mut Self {
        self.legend.push((label.to_string(), color));
        self
    }

    /// The axes ranges: the fixed ones, else fitted to the items (with a 5% margin for
    /// points and lines), else `[0, 1]`.
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let mut xs = Extent::default();
        let mut ys = Extent::default();
        let mut pad = false;
        for item in &self.items {
            match item {
                Item::Heatmap(g, _) => {
                    xs.add(g.x.0);
                    xs.add(g.x.1);
                    ys.add(g.y.0);
                    ys.add(g.y.1);
                }
                Item::Bars { bars, width, .. } => {
                    for &(x, h) in bars {
                        xs.add(x - width / 2.0);
                        xs.add(x + width / 2.0);
                        ys.add(0.0);
                        ys.add(h);
                    }
                }
                Item::Line { points, .. } | Item::Scatter { points, .. } => {
                    pad = true;
                    for &(x, y) in points {
                        xs.add(x);
                        ys.add(y);
                    }
                }
            }
        }
        let x = self.x_range.unwrap_or_else(|| xs.range(pad));
        let y = self.y_range.unwrap_or_else(|| ys.range(pad));
        (fix_range(x), fix_range(y))
    }
}

/// Running min/max of finite values.
#[derive(Default)]
struct Extent(Option<(f64, f64)>);

impl Extent {
    fn add(&mut self, v: f64) {
        if v.is_finite() {
            self.0 = Some(match self.0 {
                None => (v, v),
                Some((lo, hi)) => (lo.min(v), hi.max(v)),
            });
        }
    }

    fn range(&self, pad: bool) -> (f64, f64) {
        match self.0 {
            None => (0.0, 1.0),
            Some((lo, hi)) => {
                let m = if pad { 0.05 * (hi - lo) } else { 0.0 };
                (lo - m, hi + m)
            }
        }
    }
}

/// A range with `lo < hi` and finite ends.
fn fix_range((lo, hi): (f64, f64)) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
    if hi - lo < 1e-12 * (1.0 + lo.abs()) {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// A grid of equally sized [`Panel`]s, rendered to PNG by [`Figure::to_png`].
#[derive(Debug, Clone)]
pub struct Figure {
    rows: usize,
    cols: usize,
    panel_width: usize,
    panel_height: usize,
    panels: Vec<Panel>,
}

impl Figure {
    /// A figure of `rows × cols` empty panels, each `panel_width × panel_height` pixels.
    pub fn new(rows: usize, cols: usize, panel_width: usize, panel_height: usize) -> Figure {
        Figure {
            rows,
            cols,
            panel_width,
            panel_height,
            panels: vec![Panel::default(); rows * cols],
        }
    }

    /// Width of the whole figure in pixels.
    pub fn width(&self) -> usize {
        self.cols * self.panel_width
    }

    /// Height of the whole figure in pixels.
    pub fn height(&self) -> usize {
        self.rows * self.panel_height
    }

    /// The panel at `row`, `col` (from the top left), to draw on.
    pub fn panel(&mut self, row: usize, col: usize) -> Result<&mut Panel, PlotError> {
        let (rows, cols) = (self.rows, self.cols);
        if row >= rows || col >= cols {
            return Err(PlotError::NoSuchPanel {
                row,
                col,
                rows,
                cols,
            });
        }
        Ok(&mut self.panels[row * cols + col])
    }

    /// Renders the figure into an RGB image.
    pub fn render(&self) -> Result<Image, PlotError> {
        let (width, height) = (self.width(), self.height());
        if width == 0 || height == 0 || width > 1 << 15 || height > 1 << 15 {
            return Err(PlotError::BadSize { width, height });
        }
        let mut img = Image::new(width, height, Color::WHITE);
        for (i, panel) in self.panels.iter().enumerate() {
            let (r, c) = (i / self.cols, i % self.cols);
            let origin = (c * self.panel_width, r * self.panel_height);
            draw_panel(
                &mut img,
                panel,
                origin,
                (self.panel_width, self.panel_height),
            );
        }
        Ok(img)
    }

    /// Renders the figure and encodes it as an 8-bit RGB PNG.
    pub fn to_png(&self) -> Result<Vec<u8>, PlotError> {
        self.render()?.to_png()
    }
}

/// An RGB raster, 3 bytes per pixel, row by row from the top.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl Image {
    /// An image filled with `background`.
    pub fn new(width: usize, height: usize, background: Color) -> Image {
        let data = [background.0, background.1, background.2].repeat(width * height);
        Image {
            width,
            height,
            data,
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The color at `(x, y)` (from the top left), if inside the image.
    pub fn pixel(&self, x: usize, y: usize) -> Option<Color> {
        (x < self.width && y < self.height).then(|| {
            let o = 3 * (y * self.width + x);
            Color(self.data[o], self.data[o + 1], self.data[o + 2])
        })
    }

    /// Encodes the image as an 8-bit RGB PNG.
    pub fn to_png(&self) -> Result<Vec<u8>, PlotError> {
        let too_big = |v: usize| u32::try_from(v).map_err(|_| ());
        let (w, h) = match (too_big(self.width), too_big(self.height)) {
            (Ok(w), Ok(h)) if w > 0 && h > 0 => (w, h),
            _ => {
                return Err(PlotError::BadSize {
                    width: self.width,
                    height: self.height,
                })
            }
        };
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            writer.write_image_data(&self.data)?;
            writer.finish()?;
        }
        Ok(out)
    }

    fn put(&mut self, x: i64, y: i64, c: Color, clip: &Rect) {
        if clip.contains(x, y) && x >= 0 && y >= 0 {
            let (x, y) = (x as usize, y as usize);
            if x < self.width && y < self.height {
                let o = 3 * (y * self.width + x);
                self.data[o..o + 3].copy_from_slice(&[c.0, c.1, c.2]);
            }
        }
    }

    fn fill_rect(&mut self, r: &Rect, c: Color, clip: &Rect) {
        for y in r.y0..r.y1 {
            for x in r.x0..r.x1 {
                self.put(x, y, c, clip);
            }
        }
    }

    fn fill_circle(&mut self, cx: f64, cy: f64, radius: f64, c: Color, clip: &Rect) {
        let r = radius.max(0.5);
        let (x0, x1) = ((cx - r).floor() as i64, (cx + r).ceil() as i64);
        let (y0, y1) = ((cy - r).floor() as i64, (cy + r).ceil() as i64);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                if dx * dx + dy * dy <= r * r {
                    self.put(x, y, c, clip);
                }
            }
        }
    }

    fn segment(&mut self, a: (f64, f64), b: (f64, f64), width: f64, c: Color, clip: &Rect) {
        let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
        // Guard against absurd lengths from far-outside points.
        let n = (len * 2.0).ceil().clamp(1.0, 20_000.0) as usize;
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            if width <= 1.0 {
                self.put(x.floor() as i64, y.floor() as i64, c, clip);
            } else {
                self.fill_circle(x, y, width / 2.0, c, clip);
            }
        }
    }

    /// Draws `text` with its top-left corner at `(x, y)`; returns the width drawn.
    fn text(&mut self, x: i64, y: i64, text: &str, c: Color, clip: &Rect) -> i64 {
        let mut cx = x;
        for ch in text.chars() {
            let glyph = glyph(ch);
            for (col, bits) in glyph.iter().enumerate() {
                for row in 0..7 {
                    if bits >> row & 1 == 1 {
                        self.put(cx + col as i64, y + row, c, clip);
                    }
                }
            }
            cx += GLYPH_ADVANCE;
        }
        cx - x
    }
}

/// Pixel rectangle `[x0, x1) × [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl Rect {
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }
}

/// Horizontal advance of one character (5 pixels of glyph, 1 of spacing).
const GLYPH_ADVANCE: i64 = 6;
/// Height of a line of text.
const GLYPH_HEIGHT: i64 = 7;

/// Width in pixels of `text` in the built-in font.
fn text_width(text: &str) -> i64 {
    let n = text.chars().count() as i64;
    (n * GLYPH_ADVANCE - 1).max(0)
}

/// Where a panel's plot area lies in the figure: the panel minus room for the title,
/// the tick labels and a margin.
fn plot_area(
    panel: &Panel,
    origin: (usize, usize),
    size: (usize, usize),
    y_ticks: &[String],
) -> Rect {
    let (ox, oy) = (origin.0 as i64, origin.1 as i64);
    let (w, h) = (size.0 as i64, size.1 as i64);
    let label_w = y_ticks.iter().map(|t| text_width(t)).max().unwrap_or(0);
    let top = if panel.title.is_empty() {
        8
    } else {
        8 + GLYPH_HEIGHT + 4
    };
    let left = label_w + 8;
    let bottom = GLYPH_HEIGHT + 8;
    let right = 10;
    let r = Rect {
        x0: ox + left,
        y0: oy + top,
        x1: ox + w - right,
        y1: oy + h - bottom,
    };
    if r.x1 - r.x0 < 4 || r.y1 - r.y0 < 4 {
        // Too small for decorations: use the whole panel.
        Rect {
            x0: ox,
            y0: oy,
            x1: ox + w,
            y1: oy + h,
        }
    } else {
        r
    }
}

/// Maps data coordinates to pixel coordinates of a plot area.
struct Transform {
    area: Rect,
    x: (f64, f64),
    y: (f64, f64),
}

impl Transform {
    fn px(&self, x: f64) -> f64 {
        self.area.x0 as f64
            + (x - self.x.0) / (self.x.1 - self.x.0) * (self.area.x1 - self.area.x0) as f64
    }

    fn py(&self, y: f64) -> f64 {
        self.area.y1 as f64
            - (y - self.y.0) / (self.y.1 - self.y.0) * (self.area.y1 - self.area.y0) as f64
    }

    /// Data coordinates of a pixel's center.
    fn data(&self, px: i64, py: i64) -> (f64, f64) {
        let fx = (px as f64 + 0.5 - self.area.x0 as f64) / (self.area.x1 - self.area.x0) as f64;
        let fy = (self.area.y1 as f64 - py as f64 - 0.5) / (self.area.y1 - self.area.y0) as f64;
        (
            self.x.0 + fx * (self.x.1 - self.x.0),
            self.y.0 + fy * (self.y.1 - self.y.0),
        )
    }
}

/// "Nice" tick positions (steps of 1, 2 or 5 × 10^k) inside `[lo, hi]`, about `target`
/// of them, with their labels.
fn ticks(lo: f64, hi: f64, target: usize) -> Vec<(f64, String)> {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 || !span.is_finite() {
        return Vec::new();
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).clamp(0.0, 8.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last)
        .map(|k| {
            let v = k as f64 * step;
            let mut label = format!("{v:.decimals$}");
            if label.starts_with('-') && label[1..].chars().all(|c| c == '0' || c == '.') {
                label.remove(0);
            }
            (v, label)
        })
        .collect()
}

fn draw_panel(img: &mut Image, panel: &Panel, origin: (usize, usize), size: (usize, usize)) {
    let ((x_lo, x_hi), (y_lo, y_hi)) = panel.ranges();
    let y_ticks = ticks(y_lo, y_hi, 5);
    let labels: Vec<String> = y_ticks.iter().map(|(_, l)| l.clone()).collect();
    let area = plot_area(panel, origin, size, &labels);
    let whole = Rect {
        x0: origin.0 as i64,
        y0: origin.1 as i64,
        x1: (origin.0 + size.0) as i64,
        y1: (origin.1 + size.1) as i64,
    };
    let tf = Transform {
        area,
        x: (x_lo, x_hi),
        y: (y_lo, y_hi),
    };

    for item in &panel.items {
        match item {
            Item::Heatmap(grid, cmap) => draw_heatmap(img, &tf, grid, *cmap),
            Item::Bars { bars, width, color } => {
                for &(x, h) in bars {
                    let (a, b) = (tf.px(x - width / 2.0), tf.px(x + width / 2.0));
                    let (top, base) = (tf.py(h.max(0.0)), tf.py(h.min(0.0)));
                    let r = Rect {
                        x0: a.round() as i64,
                        x1: (b.round() as i64).max(a.round() as i64 + 1),
                        y0: top.round() as i64,
                        y1: base.round() as i64,
                    };
                    img.fill_rect(&r, *color, &area);
                }
            }
            Item::Line {
                points,
                color,
                width,
            } => {
                for w in points.windows(2) {
                    let (a, b) = (w[0], w[1]);
                    if [a.0, a.1, b.0, b.1].iter().all(|v| v.is_finite()) {
                        let pa = (tf.px(a.0), tf.py(a.1));
                        let pb = (tf.px(b.0), tf.py(b.1));
                        img.segment(pa, pb, *width, *color, &area);
                    }
                }
            }
            Item::Scatter {
                points,
                color,
                radius,
            } => {
                for &(x, y) in points {
                    if x.is_finite() && y.is_finite() {
                        img.fill_circle(tf.px(x), tf.py(y), *radius, *color, &area);
                    }
                }
            }
        }
    }

    // Frame, ticks and tick labels.
    let frame = Color::GRAY;
    for x in area.x0..area.x1 {
        img.put(x, area.y0, frame, &whole);
        img.put(x, area.y1 - 1, frame, &whole);
    }
    for y in area.y0..area.y1 {
        img.put(area.x0, y, frame, &whole);
        img.put(area.x1 - 1, y, frame, &whole);
    }
    for (v, label) in ticks(x_lo, x_hi, 5) {
        let px = tf.px(v).round() as i64;
        for d in 0..3 {
            img.put(px, area.y1 + d, Color::BLACK, &whole);
        }
        let lx = px - text_width(&label) / 2;
        img.text(lx, area.y1 + 4, &label, Color::BLACK, &whole);
    }
    for (v, label) in &y_ticks {
        let py = tf.py(*v).round() as i64;
        for d in 1..4 {
            img.put(area.x0 - d, py, Color::BLACK, &whole);
        }
        let lx = area.x0 - 5 - text_width(label);
        img.text(lx, py - GLYPH_HEIGHT / 2, label, Color::BLACK, &whole);
    }

    // Title, centred above the plot area.
    if !panel.title.is_empty() {
        let tw = text_width(&panel.title);
        let tx = ((area.x0 + area.x1) / 2 - tw / 2).max(whole.x0 + 2);
        img.text(tx, whole.y0 + 5, &panel.title, Color::BLACK, &whole);
    }

    // Legend box in the top-right corner of the plot area.
    if !panel.legend.is_empty() {
        let line_h = GLYPH_HEIGHT + 4;
        let text_w = panel
            .legend
            .iter()
            .map(|(l, _)| text_width(l))
            .max()
            .unwrap_or(0);
        let box_w = 4 + 7 + 4 + text_w + 4;
        let box_h = 3 + line_h * panel.legend.len() as i64;
        let b = Rect {
            x0: area.x1 - 4 - box_w,
            y0: area.y0 + 4,
            x1: area.x1 - 4,
            y1: area.y0 + 4 + box_h,
        };
        img.fill_rect(&b, Color::WHITE, &area);
        for x in b.x0..b.x1 {
            img.put(x, b.y0, Color::LIGHT_GRAY, &area);
            img.put(x, b.y1 - 1, Color::LIGHT_GRAY, &area);
        }
        for y in b.y0..b.y1 {
            img.put(b.x0, y, Color::LIGHT_GRAY, &area);
            img.put(b.x1 - 1, y, Color::LIGHT_GRAY, &area);
        }
        for (i, (label, color)) in panel.legend.iter().enumerate() {
            let y = b.y0 + 3 + line_h * i as i64;
            let sq = Rect {
                x0: b.x0 + 4,
                y0: y,
                x1: b.x0 + 11,
                y1: y + 7,
            };
            img.fill_rect(&sq, *color, &area);
            img.text(b.x0 + 15, y, label, Color::BLACK, &area);
        }
    }
}

fn draw_heatmap(img: &mut Image, tf: &Transform, grid: &Grid, cmap: Colormap) {
    let Some((lo, hi)) = grid.finite_range() else {
        return;
    };
    let span = if hi > lo { hi - lo } else { 1.0 };
    let (gw, gh) = (grid.x.1 - grid.x.0, grid.y.1 - grid.y.0);
    if gw == 0.0 || gh == 0.0 {
        return;
    }
    let area = tf.area;
    for py in area.y0..area.y1 {
        for px in area.x0..area.x1 {
            let (x, y) = tf.data(px, py);
            let fi = (x - grid.x.0) / gw * grid.nx as f64;
            let fj = (y - grid.y.0) / gh * grid.ny as f64;
            if fi < 0.0 || fj < 0.0 || fi >= grid.nx as f64 || fj >= grid.ny as f64 {
                continue;
            }
            let v = grid.values[fj as usize * grid.nx + fi as usize];
            if v.is_finite() {
                img.put(px, py, cmap.map((v - lo) / span), &area);
            }
        }
    }
}

/// The 5×7 glyph of `c`: five columns, bit 0 the top row. Characters outside printable
/// ASCII draw as `?`.
fn glyph(c: char) -> [u8; 5] {
    let code = c as u32;
    if (0x20..0x7f).contains(&code) {
        FONT[(code - 0x20) as usize]
    } else {
        FONT[('?' as u32 - 0x20) as usize]
    }
}

/// The classic 5×7 LCD font for ASCII 0x20..=0x7E, column-major, bit 0 at the top.
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5f, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7f, 0x14, 0x7f, 0x14], // #
    [0x24, 0x2a, 0x7f, 0x2a, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x55, 0x22, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1c, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1c, 0x00], // )
    [0x14, 0x08, 0x3e, 0x08, 0x14], // *
    [0x08, 0x08, 0x3e, 0x08, 0x08], // +
    [0x00, 0x50, 0x30, 0x00, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x60, 0x60, 0x00, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3e, 0x51, 0x49, 0x45, 0x3e], // 0
    [0x00, 0x42, 0x7f, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4b, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7f, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3c, 0x4a, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1e], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3e], // @
    [0x7e, 0x11, 0x11, 0x11, 0x7e], // A
    [0x7f, 0x49, 0x49, 0x49, 0x36], // B
    [0x3e, 0x41, 0x41, 0x41, 0x22], // C
    [0x7f, 0x41, 0x41, 0x22, 0x1c], // D
    [0x7f, 0x49, 0x49, 0x49, 0x41], // E
    [0x7f, 0x09, 0x09, 0x09, 0x01], // F
    [0x3e, 0x41, 0x49, 0x49, 0x7a], // G
    [0x7f, 0x08, 0x08, 0x08, 0x7f], // H
    [0x00, 0x41, 0x7f, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3f, 0x01], // J
    [0x7f, 0x08, 0x14, 0x22, 0x41], // K
    [0x7f, 0x40, 0x40, 0x40, 0x40], // L
    [0x7f, 0x02, 0x0c, 0x02, 0x7f], // M
    [0x7f, 0x04, 0x08, 0x10, 0x7f], // N
    [0x3e, 0x41, 0x41, 0x41, 0x3e], // O
    [0x7f, 0x09, 0x09, 0x09, 0x06], // P
    [0x3e, 0x41, 0x51, 0x21, 0x5e], // Q
    [0x7f, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7f, 0x01, 0x01], // T
    [0x3f, 0x40, 0x40, 0x40, 0x3f], // U
    [0x1f, 0x20, 0x40, 0x20, 0x1f], // V
    [0x3f, 0x40, 0x38, 0x40, 0x3f], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7f, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // backslash
    [0x00, 0x41, 0x41, 0x7f, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x40, 0x40, 0x40, 0x40, 0x40], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7f, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7f], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7e, 0x09, 0x01, 0x02], // f
    [0x0c, 0x52, 0x52, 0x52, 0x3e], // g
    [0x7f, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7d, 0x40, 0x00], // i
    [0x20, 0x40, 0x44, 0x3d, 0x00], // j
    [0x7f, 0x10, 0x28, 0x44, 0x00], // k
    [0x00, 0x41, 0x7f, 0x40, 0x00], // l
    [0x7c, 0x04, 0x18, 0x04, 0x78], // m
    [0x7c, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0x7c, 0x14, 0x14, 0x14, 0x08], // p
    [0x08, 0x14, 0x14, 0x18, 0x7c], // q
    [0x7c, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3f, 0x44, 0x40, 0x20], // t
    [0x3c, 0x40, 0x40, 0x20, 0x7c], // u
    [0x1c, 0x20, 0x40, 0x20, 0x1c], // v
    [0x3c, 0x40, 0x30, 0x40, 0x3c], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x0c, 0x50, 0x50, 0x50, 0x3c], // y
    [0x44, 0x64, 0x54, 0x4c, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7f, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x10, 0x08, 0x08, 0x10, 0x08], // ~
];

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
        let info = reader.next_frame(&mut buf).expect("png frame");
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    fn px(info: &png::OutputInfo, data: &[u8], x: usize, y: usize) -> Color {
        let o = 3 * (y * info.width as usize + x);
        Color(data[o], data[o + 1], data[o + 2])
    }

    #[test]
    fn png_decodes_with_the_figure_size() {
        let mut fig = Figure::new(2, 3, 120, 90);
        fig.panel(1, 2)
            .unwrap()
            .title("t")
            .line(&[(0.0, 0.0), (1.0, 1.0)], Color::BLUE, 2.0);
        let bytes = fig.to_png().unwrap();
        let (info, data) = decode(&bytes);
        assert_eq!((info.width, info.height), (360, 180));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        assert_eq!(data.len(), 360 * 180 * 3);
        assert!(fig.panel(2, 0).is_err());
        assert!(Figure::new(0, 1, 10, 10).to_png().is_err());
    }

    #[test]
    fn a_scatter_point_has_its_color_at_its_position() {
        let mut fig = Figure::new(1, 1, 200, 160);
        let red = Color::rgb(250, 10, 20);
        fig.panel(0, 0)
            .unwrap()
            .x_range(-1.0, 1.0)
            .y_range(0.0, 4.0)
            .scatter(&[(0.5, 1.0)], red, 3.0);
        let (info, data) = decode(&fig.to_png().unwrap());
        // where the panel puts its plot area and the point
        let panel = &fig.panels[0];
        let labels: Vec<String> = ticks(0.0, 4.0, 5).into_iter().map(|t| t.1).collect();
        let area = plot_area(panel, (0, 0), (200, 160), &labels);
        let tf = Transform {
            area,
            x: (-1.0, 1.0),
            y: (0.0, 4.0),
        };
        let (x, y) = (tf.px(0.5) as usize, tf.py(1.0) as usize);
        assert_eq!(px(&info, &data, x, y), red);
        assert_eq!(px(&info, &data, x + 1, y), red);
        // far from the point the plot area is background
        assert_eq!(px(&info, &data, x - 20, y), Color::WHITE);
    }

    #[test]
    fn text_renders_non_background_pixels() {
        let mut img = Image::new(40, 12, Color::WHITE);
        let all = Rect {
            x0: 0,
            y0: 0,
            x1: 40,
            y1: 12,
        };
        let w = img.text(1, 1, "Ag-1", Color::BLACK, &all);
        assert_eq!(w, 4 * GLYPH_ADVANCE);
        let dark = (0..12)
            .flat_map(|y| (0..40).map(move |x| (x, y)))
            .filter(|&(x, y)| img.pixel(x, y) == Some(Color::BLACK))
            .count();
        assert!(dark > 20, "{dark} text pixels");
        // spaces draw nothing, unknown characters draw '?'
        let mut blank = Image::new(20, 10, Color::WHITE);
        blank.text(0, 0, "  ", Color::BLACK, &all);
        assert_eq!(blank, Image::new(20, 10, Color::WHITE));
        assert_eq!(glyph('é'), glyph('?'));

        // a titled panel draws its title in black above the plot area
        let mut fig = Figure::new(1, 1, 100, 80);
        fig.panel(0, 0).unwrap().title("TITLE");
        let img = fig.render().unwrap();
        let title_pixels = (0..16)
            .flat_map(|y| (0..100).map(move |x| (x, y)))
            .filter(|&(x, y)| img.pixel(x, y) == Some(Color::BLACK))
            .count();
        assert!(title_pixels > 20, "{title_pixels}");
    }

    #[test]
    fn heatmap_uses_the_colormap_ends_and_histogram_counts() {
        let grid = Grid::from_fn(2, 1, (0.0, 2.0), (0.0, 1.0), |x, _| x);
        assert_eq!(grid.values(), &[0.5, 1.5]);
        let mut fig = Figure::new(1, 1, 120, 100);
        fig.panel(0, 0).unwrap().heatmap(&grid, Colormap::Viridis);
        let img = fig.render().unwrap();
        let labels: Vec<String> = ticks(0.0, 1.0, 5).into_iter().map(|t| t.1).collect();
        let area = plot_area(&fig.panels[0], (0, 0), (120, 100), &labels);
        let mid_y = ((area.y0 + area.y1) / 2) as usize;
        assert_eq!(img.pixel(area.x0 as usize + 3, mid_y), Some(VIRIDIS[0]));
        assert_eq!(img.pixel(area.x1 as usize - 3, mid_y), Some(VIRIDIS[8]));
        assert_eq!(Colormap::Grays.map(0.5), Color(128, 128, 128));
        assert!(Grid::new(2, 2, (0.0, 1.0), (0.0, 1.0), vec![0.0; 3]).is_err());

        let mut panel = Panel::default();
        panel.histogram(&[0.0, 0.1, 0.9, 1.0, f64::NAN], 2, Color::GREEN);
        match &panel.items[0] {
            Item::Bars { bars, width, .. } => {
                assert_eq!(bars.len(), 2);
                assert_eq!((bars[0].1, bars[1].1), (2.0, 2.0));
                assert!((width - 0.5).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        panel.legend("counts", Color::GREEN);
        let ((x0, x1), (y0, y1)) = panel.ranges();
        assert_eq!((x0, x1, y0, y1), (0.0, 1.0, 0.0, 2.0));
    }

    #[test]
    fn ticks_are_round_numbers_inside_the_range() {
        let t: Vec<String> = ticks(-2.0, 2.0, 5).into_iter().map(|t| t.1).collect();
        assert_eq!(t, vec!["-2", "-1", "0", "1", "2"]);
        let t: Vec<String> = ticks(0.0, 0.35, 5).into_iter().map(|t| t.1).collect();
        assert_eq!(t, vec!["0.0", "0.1", "0.2", "0.3"]);
        assert!(ticks(1.0, 1.0, 5).is_empty());
    }
}
