//! C API §4: flat parameters.
