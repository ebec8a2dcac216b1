"""Pure functions without parameters: selective scan, deformable attention, point sampling."""
