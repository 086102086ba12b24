"""Data utilities: seeded client partitioners (``iid``, ``dir-a{α}``, ``patho-c{c}a{α}``)."""

from raflora.data.partition import (
    PARTITION_FORMS,
    DirichletPartitioner,
    IIDPartitioner,
    Partitioner,
    PartitionSpec,
    PathologicalPartitioner,
    parse_partition,
    partition,
    summarize_partition,
)

__all__ = [
    "PARTITION_FORMS",
    "DirichletPartitioner",
    "IIDPartitioner",
    "PartitionSpec",
    "Partitioner",
    "PathologicalPartitioner",
    "parse_partition",
    "partition",
    "summarize_partition",
]
