//! Loads ONNX Runtime (`libonnxruntime.so` from the pinned PyPI wheel, put in the cache by
//! `scripts/provision.py`) once per process, and reports its version.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The ONNX Runtime version the provisioning script installs; ort's `api-31` matches it.
pub const PINNED_VERSION: &str = "1.31.1";

struct Loaded {
    env: ort::environment::Environment,
    version: String,
    path: PathBuf,
}

static RUNTIME: OnceLock<Result<Loaded, String>> = OnceLock::new();

/// The library to load: the config's `onnxruntime.library`, else `$TIERGATE_ORT_LIB`, else
/// the provisioned copy in the cache.
pub fn library_path(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("TIERGATE_ORT_LIB").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    crate::cache::cache_dir()
        .join("onnxruntime")
        .join(PINNED_VERSION)
        .join("libonnxruntime.so")
}

/// Loads ONNX Runtime once; later calls return the first result. Returns the version.
pub fn init(configured: Option<&Path>) -> Result<String, String> {
    let loaded = RUNTIME.get_or_init(|| {
        let path = library_path(configured);
        if !path.exists() {
            return Err(format!(
                "ONNX Runtime library not found at `{}`; run `python3 scripts/provision.py` (or set `onnxruntime.library` in the config)",
                path.display()
            ));
        }
        let env = ort::init_from(&path)
            .map_err(|e| format!("cannot load ONNX Runtime from `{}`: {e}", path.display()))?
            .with_name("tiergate")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime: {e}"))?;
        Ok(Loaded { env, version: library_version(&path)?, path })
    });
    match loaded {
        Ok(l) => {
            if configured.is_some_and(|c| c != l.path) {
                tracing::warn!(loaded = %l.path.display(), "ONNX Runtime was already loaded from another path");
            }
            Ok(l.version.clone())
        }
        Err(e) => Err(e.clone()),
    }
}

/// The loaded library's version; `None` until [`init`] has succeeded (a gateway with neither
/// a classifier nor a local tier never loads it).
pub fn loaded_version() -> Option<String> {
    RUNTIME.get().and_then(|r| r.as_ref().ok()).map(|l| l.version.clone())
}

/// The process's ONNX Runtime environment, which every session is built from; `None`
/// until [`init`] has succeeded.
pub fn environment() -> Option<&'static ort::environment::Environment> {
    RUNTIME.get().and_then(|r| r.as_ref().ok()).map(|l| &l.env)
}

/// The library's own version string (`OrtGetApiBase()->GetVersionString()`); ort does not
/// expose it, and its build info names a git branch, not a release.
fn library_version(path: &Path) -> Result<String, String> {
    // SAFETY: the library is already loaded by ort (dlopen returns the same handle), and
    // `OrtGetApiBase` is ONNX Runtime's documented, argument-free C entry point returning a
    // static struct whose `GetVersionString` returns a static NUL-terminated string.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| format!("cannot open `{}`: {e}", path.display()))?;
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> = lib
            .get(b"OrtGetApiBase")
            .map_err(|e| format!("`{}` is not ONNX Runtime: {e}", path.display()))?;
        let base = get();
        if base.is_null() {
            return Err(format!("`{}` returned no API base", path.display()));
        }
        let version = ((*base).GetVersionString)();
        Ok(std::ffi::CStr::from_ptr(version).to_string_lossy().into_owned())
    }
}
