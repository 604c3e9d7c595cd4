//! Model averaging for local SGD. See SPEC.md §1.
