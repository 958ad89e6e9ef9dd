// Which node every rank of a group sits on. Pure data: no torch, no CUDA.
#pragma once

#include <vector>

namespace alltoall::plan {

class NodeMap {
 public:
  // node_of_rank[r] is the node of group rank r. Node ids must be 0..N-1,
  // each used at least once; ranks of a node need not be consecutive.
  explicit NodeMap(std::vector<int> node_of_rank);

  // Nodes of `ranks_per_node` consecutive ranks: what torchrun and Slurm's
  // block distribution give.
  static NodeMap consecutive(int world_size, int ranks_per_node);

  int world_size() const { return static_cast<int>(node_of_rank_.size()); }
  int num_nodes() const { return static_cast<int>(ranks_of_node_.size()); }
  int node_of(int rank) const { return node_of_rank_.at(rank); }
  // Position of `rank` among the ascending ranks of its node.
  int local_index(int rank) const { return local_index_.at(rank); }
  // Ascending group ranks of `node`; this is the order of its subgroup.
  const std::vector<int>& ranks_of_node(int node) const { return ranks_of_node_.at(node); }
  // Ascending ranks that hold local index `local` on their node.
  std::vector<int> ranks_with_local_index(int local) const;
  const std::vector<int>& node_of_rank() const { return node_of_rank_; }

  bool uniform() const;
  // Ranks per node; throws std::invalid_argument naming the node sizes when
  // nodes differ in size.
  int ranks_per_node() const;

 private:
  std::vector<int> node_of_rank_;
  std::vector<std::vector<int>> ranks_of_node_;
  std::vector<int> local_index_;
};

}  // namespace alltoall::plan
