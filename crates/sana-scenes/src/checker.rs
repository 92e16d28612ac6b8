//! Reads a scene back from a generated image: the background colour, and each object's colour,
//! position, size and shape. The rules mirror `check` in `tools/scenes/world.py` (the training
//! script's own evaluation); this is the one the tests use.
//!
//! Every pixel is classified as its nearest palette colour; the most frequent class is the
//! background; 4-connected components of other pixels with at least [`MIN_PIXELS`] pixels are
//! objects. An object's colour is its majority class, its position the side of the image its
//! centroid lies on (or the centre), its size from its bounding box, its shape from how much of the
//! bounding box it fills and whether it narrows towards the top (a triangle, apex up).

use serde::{Deserialize, Serialize};

/// The world's palette, as in `world.py`'s `COLORS`.
pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 60, 220]),
    ("yellow", [245, 220, 30]),
    ("purple", [140, 40, 170]),
    ("orange", [245, 130, 20]),
    ("white", [245, 245, 245]),
    ("black", [15, 15, 15]),
];
/// Smaller components are noise.
pub const MIN_PIXELS: usize = 20;
/// A centroid within this many pixels of the image centre (in x and in y) is "centre" (for 64²;
/// scaled with the image).
const CENTRE_RADIUS: f64 = 8.0;
/// A bounding-box side above this is "large" (small objects are 12–16 px, large 24–28 px at 64²).
const LARGE_EXTENT: f64 = 20.0;

/// One object of a scene.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub shape: String,
    pub color: String,
    pub size: String,
    pub position: String,
}

/// What a caption describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scene {
    pub background: String,
    pub objects: Vec<Object>,
}

/// What the checker found: the background and the objects, largest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Found {
    pub background: String,
    pub objects: Vec<FoundObject>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FoundObject {
    #[serde(flatten)]
    pub object: Object,
    pub pixels: usize,
}

fn nearest(rgb: &[u8]) -> usize {
    let mut best = (0, u32::MAX);
    for (i, (_, c)) in COLORS.iter().enumerate() {
        let d: u32 = rgb
            .iter()
            .zip(c)
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).pow(2) as u32)
            .sum();
        if d < best.1 {
            best = (i, d);
        }
    }
    best.0
}

/// Reads a scene from interleaved RGB8 pixels of a `width`×`height` image.
pub fn check(rgb8: &[u8], width: usize, height: usize) -> Found {
    assert_eq!(rgb8.len(), width * height * 3, "RGB8 buffer size");
    let class: Vec<usize> = rgb8.chunks_exact(3).map(nearest).collect();
    let mut counts = [0usize; COLORS.len()];
    for &c in &class {
        counts[c] += 1;
    }
    // The first of equal counts wins, as numpy's argmax.
    let bg = (0..COLORS.len())
        .rev()
        .max_by_key(|&i| counts[i])
        .unwrap_or(0);
    let mut seen = vec![false; class.len()];
    let mut objects = Vec::new();
    for start in 0..class.len() {
        if class[start] == bg || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let mut pixels = Vec::new();
        while let Some(i) = stack.pop() {
            pixels.push(i);
            let (y, x) = (i / width, i % width);
            let mut visit = |j: usize| {
                if class[j] != bg && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if y + 1 < height {
                visit(i + width);
            }
            if y > 0 {
                visit(i - width);
            }
            if x + 1 < width {
                visit(i + 1);
            }
            if x > 0 {
                visit(i - 1);
            }
        }
        if pixels.len() >= MIN_PIXELS {
            objects.push(describe(&pixels, &class, width, height));
        }
    }
    objects.sort_by_key(|o| std::cmp::Reverse(o.pixels));
    Found {
        background: COLORS[bg].0.to_string(),
        objects,
    }
}

fn describe(pixels: &[usize], class: &[usize], width: usize, height: usize) -> FoundObject {
    let mut counts = [0usize; COLORS.len()];
    let (mut sx, mut sy) = (0f64, 0f64);
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for &i in pixels {
        counts[class[i]] += 1;
        let (y, x) = (i / width, i % width);
        sx += x as f64;
        sy += y as f64;
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let color = (0..COLORS.len())
        .rev()
        .max_by_key(|&i| counts[i])
        .unwrap_or(0);
    let n = pixels.len() as f64;
    let scale = width.min(height) as f64 / 64.0;
    let (cx, cy) = (sx / n + 0.5, sy / n + 0.5);
    let (dx, dy) = (cx - width as f64 / 2.0, cy - height as f64 / 2.0);
    let position = if dx.abs() < CENTRE_RADIUS * scale && dy.abs() < CENTRE_RADIUS * scale {
        "centre"
    } else if dx.abs() > dy.abs() {
        if dx > 0.0 {
            "right"
        } else {
            "left"
        }
    } else if dy > 0.0 {
        "bottom"
    } else {
        "top"
    };
    let (h, w) = ((y1 - y0 + 1) as f64, (x1 - x0 + 1) as f64);
    let fill = n / (h * w);
    // Width of the top and bottom thirds of the rows.
    let span = |keep: &dyn Fn(f64) -> bool| {
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for &i in pixels {
            if keep((i / width) as f64) {
                lo = lo.min(i % width);
                hi = hi.max(i % width);
            }
        }
        if lo == usize::MAX {
            0.0
        } else {
            (hi - lo + 1) as f64
        }
    };
    let top = span(&|y| y < y0 as f64 + h / 3.0);
    let bottom = span(&|y| y >= (y1 + 1) as f64 - h / 3.0);
    let shape = if top < 0.6 * bottom && fill < 0.7 {
        "triangle"
    } else if fill > 0.88 {
        "square"
    } else {
        "circle"
    };
    let size = if h.max(w) > LARGE_EXTENT * scale {
        "large"
    } else {
        "small"
    };
    FoundObject {
        object: Object {
            shape: shape.into(),
            color: COLORS[color].0.into(),
            size: size.into(),
            position: position.into(),
        },
        pixels: pixels.len(),
    }
}

/// Hits per attribute over many scenes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub scenes: usize,
    pub background: usize,
    /// Expected objects (the denominator of the four below).
    pub objects: usize,
    pub color: usize,
    pub position: usize,
    pub shape: usize,
    pub size: usize,
}

impl Tally {
    /// Adds one scene: each expected object is compared with the found object of its colour, else
    /// the largest one not yet matched; a missing object misses everything.
    pub fn add(&mut self, expected: &Scene, found: &Found) {
        self.scenes += 1;
        self.background += usize::from(found.background == expected.background);
        let mut left: Vec<&FoundObject> = found.objects.iter().collect();
        for obj in &expected.objects {
            self.objects += 1;
            if left.is_empty() {
                continue;
            }
            let k = left
                .iter()
                .position(|o| o.object.color == obj.color)
                .unwrap_or(0);
            let m = &left.remove(k).object;
            self.color += usize::from(m.color == obj.color);
            self.position += usize::from(m.position == obj.position);
            self.shape += usize::from(m.shape == obj.shape);
            self.size += usize::from(m.size == obj.size);
        }
    }

    fn pct(hits: usize, of: usize) -> f64 {
        if of == 0 {
            0.0
        } else {
            100.0 * hits as f64 / of as f64
        }
    }

    pub fn background_pct(&self) -> f64 {
        Self::pct(self.background, self.scenes)
    }
    pub fn color_pct(&self) -> f64 {
        Self::pct(self.color, self.objects)
    }
    pub fn position_pct(&self) -> f64 {
        Self::pct(self.position, self.objects)
    }
    pub fn shape_pct(&self) -> f64 {
        Self::pct(self.shape, self.objects)
    }
    pub fn size_pct(&self) -> f64 {
        Self::pct(self.size, self.objects)
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} scenes, {} objects: background {:.0}%, colour {:.0}%, position {:.0}%, shape {:.0}%, size {:.0}%",
            self.scenes,
            self.objects,
            self.background_pct(),
            self.color_pct(),
            self.position_pct(),
            self.shape_pct(),
            self.size_pct()
        )
    }
}
