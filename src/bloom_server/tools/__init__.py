"""Tools over the whole stack (the cross-backend benchmark). They may import anything; nothing imports them but the
command line's dispatch."""
