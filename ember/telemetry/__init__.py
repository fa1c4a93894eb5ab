"""What a run measures about itself: throughput and FLOPs, memory, and the CPU allocator setting."""
