//! ztunnel library.
