"""Object stores for outputs and uploads, behind one small interface."""
