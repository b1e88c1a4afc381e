//! Topic names and filters. (Stub: being written.)
