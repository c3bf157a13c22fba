//! How a denoiser's plans compute: the precision and the convolution setting.

use tract_onnx::prelude::*;

use crate::error::{Error, Result};

/// Arithmetic precision of the denoiser's float operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// float32 everywhere, as exported.
    #[default]
    F32,
    /// float16 arithmetic. On aarch64 CPUs with FP16 arithmetic (ARMv8.2-A: Cortex-A55/A75/A76/
    /// A78, Pi 5, Jetson Orin) and [`Convolution::Winograd`], edge-diffuse's convolutions
    /// (Winograd, 1×1, strided, direct) multiply and sum in float16 on its float16 kernel, and the
    /// rest of the plan stays float32. Otherwise tract's f32→f16 translation of the graph's
    /// weights and operators, with the sample and the prediction float32 at the boundary: fast
    /// on cores with fp16 arithmetic, while elsewhere (x86-64, Cortex-A72) tract falls back to a
    /// generic kernel that is many times slower than f32.
    F16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            other => Err(Error::config("precision", format!("expected f32 or f16, got {other:?}"))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        })
    }
}

impl Precision {
    pub(crate) fn float_type(self) -> DatumType {
        match self {
            Precision::F32 => f32::datum_type(),
            Precision::F16 => f16::datum_type(),
        }
    }
}

/// How the denoiser's 3×3 convolutions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Convolution {
    /// Float32 3×3, stride-1, padding-1 convolutions by Winograd's F(2×2, 3×3) (2.25× fewer
    /// multiplications; rounding differences of a few 1e-7 relative), and on x86-64 with AVX2
    /// and FMA the 1×1 convolutions on the same matrix kernel; the rest as `Im2col`.
    /// Float16 plans, and 32-bit ARM builds (no fast matrix product for it there), always use
    /// `Im2col`.
    #[default]
    Winograd,
    /// Every convolution as tract compiles it: an im2col (3×3) or plain (1×1) matrix product.
    Im2col,
}

impl std::str::FromStr for Convolution {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "winograd" => Ok(Convolution::Winograd),
            "im2col" => Ok(Convolution::Im2col),
            other => Err(Error::config("convolution", format!("expected winograd or im2col, got {other:?}"))),
        }
    }
}

impl std::fmt::Display for Convolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Convolution::Winograd => "winograd",
            Convolution::Im2col => "im2col",
        })
    }
}

/// Where the plan file of a graph's packed weights goes (see `docs/memory.md`): the first load
/// writes the weights in the layout the kernels read, later loads map that file read-only and
/// the kernels read their weights through the map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PlanCache {
    /// Beside the ONNX file when its folder is writable, else in `$XDG_CACHE_HOME/edge-diffuse`
    /// (`~/.cache/edge-diffuse`); the heap, as [`PlanCache::Off`], when neither is writable.
    #[default]
    Auto,
    /// In this folder.
    Dir(std::path::PathBuf),
    /// No plan file: the weights are packed on the heap at every load.
    Off,
}

impl std::str::FromStr for PlanCache {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(PlanCache::Auto),
            "off" => Ok(PlanCache::Off),
            "" => Err(Error::config("plan-cache", "expected auto, off or a folder, got an empty string")),
            dir => Ok(PlanCache::Dir(dir.into())),
        }
    }
}

impl std::fmt::Display for PlanCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanCache::Auto => f.write_str("auto"),
            PlanCache::Off => f.write_str("off"),
            PlanCache::Dir(d) => write!(f, "{}", d.display()),
        }
    }
}

/// The precision the packed weights of our operators are stored in, on the heap and in the
/// plan file (see `docs/memory.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightPrecision {
    /// float32, as exported: the same bits as the graph.
    #[default]
    F32,
    /// float16 (rounded to nearest even): half the bytes. The kernels widen a few panels at a
    /// time to float32 just before they use them and compute in float32, so only the weights'
    /// own rounding changes the result.
    F16,
}

impl WeightPrecision {
    /// Bytes per weight.
    pub(crate) fn bytes(self) -> usize {
        match self {
            WeightPrecision::F32 => 4,
            WeightPrecision::F16 => 2,
        }
    }
}

impl std::str::FromStr for WeightPrecision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(WeightPrecision::F32),
            "f16" => Ok(WeightPrecision::F16),
            other => Err(Error::config("weights", format!("expected f32 or f16, got {other:?}"))),
        }
    }
}

impl std::fmt::Display for WeightPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightPrecision::F32 => "f32",
            WeightPrecision::F16 => "f16",
        })
    }
}
