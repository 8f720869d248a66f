"""Lightning callbacks that show why Adai behaves as it does: inertia, sharpness, saddle escape."""
