"""Image providers behind one protocol; `base` holds the seam, each module one API."""
