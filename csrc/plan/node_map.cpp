#include "plan/node_map.h"

#include <sstream>
#include <stdexcept>
#include <string>

namespace alltoall::plan {

namespace {

std::string join(const std::vector<int>& values, size_t limit = 16) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size() && i < limit; ++i) {
    out << (i ? ", " : "") << values[i];
  }
  if (values.size() > limit) out << ", ... (" << values.size() << " in all)";
  out << "]";
  return out.str();
}

}  // namespace

NodeMap::NodeMap(std::vector<int> node_of_rank) : node_of_rank_(std::move(node_of_rank)) {
  if (node_of_rank_.empty()) {
    throw std::invalid_argument("NodeMap: node_of_rank is empty; a group has at least one rank");
  }
  int max_node = -1;
  for (size_t r = 0; r < node_of_rank_.size(); ++r) {
    if (node_of_rank_[r] < 0) {
      throw std::invalid_argument("NodeMap: rank " + std::to_string(r) + " has negative node id " +
                                  std::to_string(node_of_rank_[r]));
    }
    max_node = std::max(max_node, node_of_rank_[r]);
  }
  ranks_of_node_.assign(max_node + 1, {});
  local_index_.assign(node_of_rank_.size(), 0);
  for (int r = 0; r < world_size(); ++r) {
    auto& members = ranks_of_node_[node_of_rank_[r]];
    local_index_[r] = static_cast<int>(members.size());
    members.push_back(r);
  }
  for (int n = 0; n < num_nodes(); ++n) {
    if (ranks_of_node_[n].empty()) {
      throw std::invalid_argument("NodeMap: node ids must be 0..N-1 with none unused; node " +
                                  std::to_string(n) + " has no rank in " + join(node_of_rank_));
    }
  }
}

NodeMap NodeMap::consecutive(int world_size, int ranks_per_node) {
  if (world_size < 1) {
    throw std::invalid_argument("world_size must be >= 1, got " + std::to_string(world_size));
  }
  if (ranks_per_node < 1 || world_size % ranks_per_node != 0) {
    throw std::invalid_argument("ranks_per_node=" + std::to_string(ranks_per_node) +
                                " must be >= 1 and divide world_size=" + std::to_string(world_size));
  }
  std::vector<int> nodes(world_size);
  for (int r = 0; r < world_size; ++r) nodes[r] = r / ranks_per_node;
  return NodeMap(std::move(nodes));
}

std::vector<int> NodeMap::ranks_with_local_index(int local) const {
  std::vector<int> ranks;
  for (int r = 0; r < world_size(); ++r) {
    if (local_index_[r] == local) ranks.push_back(r);
  }
  return ranks;
}

bool NodeMap::uniform() const {
  for (const auto& members : ranks_of_node_) {
    if (members.size() != ranks_of_node_.front().size()) return false;
  }
  return true;
}

int NodeMap::ranks_per_node() const {
  if (!uniform()) {
    std::vector<int> sizes;
    for (const auto& members : ranks_of_node_) sizes.push_back(static_cast<int>(members.size()));
    throw std::invalid_argument("nodes have unequal sizes " + join(sizes) +
                                "; the hierarchical exchange needs the same number of ranks on every node");
  }
  return static_cast<int>(ranks_of_node_.front().size());
}

}  // namespace alltoall::plan
