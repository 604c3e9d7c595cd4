//! C API §5: model averaging.
