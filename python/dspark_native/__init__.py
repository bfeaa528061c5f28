"""dspark-native: fast, exact DSpark speculative decoding.

The fused ops (``verify_chain`` ...) live in :mod:`dspark_native.ops` and need the compiled
extension; they are loaded on first use so that pure-Python parts (models, scheduler policies)
import without it.
"""
