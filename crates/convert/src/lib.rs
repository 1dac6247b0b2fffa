//! Converting one device into another (being written).
