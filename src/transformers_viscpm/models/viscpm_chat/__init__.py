"""VisCPM-Chat: BEiT-3 vision tower, image processor and the CPM-Bee chat model."""
