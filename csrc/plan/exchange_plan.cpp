#include "plan/exchange_plan.h"

#include <algorithm>
#include <stdexcept>

namespace alltoall::plan {

namespace {

using Permutation = std::vector<int64_t>;

bool is_identity(const Permutation& perm) {
  for (size_t i = 0; i < perm.size(); ++i) {
    if (perm[i] != static_cast<int64_t>(i)) return false;
  }
  return true;
}

// Applying `first` then `second` equals applying the result once.
Permutation compose(const Permutation& first, const Permutation& second) {
  if (first.empty()) return second;
  if (second.empty()) return first;
  Permutation out(second.size());
  for (size_t i = 0; i < second.size(); ++i) out[i] = first[second[i]];
  return out;
}

int index_of(const std::vector<int>& ranks, int rank) {
  auto it = std::lower_bound(ranks.begin(), ranks.end(), rank);
  if (it == ranks.end() || *it != rank) {
    throw std::logic_error("rank " + std::to_string(rank) + " is not in its own phase group");
  }
  return static_cast<int>(it - ranks.begin());
}

Phase make_phase(GroupRole role, std::vector<int> ranks, int me, int blocks_per_peer, Permutation pre,
                 Collective collective = Collective::kAllToAll) {
  Phase phase;
  phase.collective = collective;
  phase.role = role;
  phase.index_in_group = index_of(ranks, me);
  phase.group_ranks = std::move(ranks);
  phase.blocks_per_peer = blocks_per_peer;
  phase.pre_permutation = std::move(pre);
  return phase;
}

// Drops phases whose group is this rank alone (they move nothing), folding
// their reorder into the next one, and clears identity reorders so the
// executor can skip them.
void simplify(ExchangePlan& plan) {
  std::vector<Phase> kept;
  Permutation pending;
  for (auto& phase : plan.phases) {
    Permutation pre = compose(pending, phase.pre_permutation);
    if (phase.group_ranks.size() == 1) {
      pending = std::move(pre);
      continue;
    }
    pending.clear();
    phase.pre_permutation = is_identity(pre) ? Permutation{} : std::move(pre);
    kept.push_back(std::move(phase));
  }
  Permutation post = compose(pending, plan.post_permutation);
  plan.post_permutation = is_identity(post) ? Permutation{} : std::move(post);
  plan.phases = std::move(kept);
}

void count_traffic(const NodeMap& nodes, ExchangePlan& plan) {
  const int my_node = nodes.node_of(plan.rank);
  for (const auto& phase : plan.phases) {
    for (int peer : phase.group_ranks) {
      if (peer == plan.rank) continue;
      LinkTraffic& link = nodes.node_of(peer) == my_node ? plan.intra_node : plan.inter_node;
      link.messages += 1;
      link.blocks += phase.blocks_per_peer;
      // Gathered sizes follow from the splits every member already knows.
      if (phase.collective == Collective::kAllToAll) link.counts += phase.blocks_per_peer;
    }
  }
}

void check_rank(const NodeMap& nodes, int rank) {
  if (rank < 0 || rank >= nodes.world_size()) {
    throw std::invalid_argument("rank=" + std::to_string(rank) + " is outside a group of world_size=" +
                                std::to_string(nodes.world_size()));
  }
}

ExchangePlan flat_plan(const NodeMap& nodes, int rank) {
  ExchangePlan plan;
  plan.algorithm = Algorithm::kFlat;
  plan.world_size = nodes.world_size();
  plan.rank = rank;
  plan.num_blocks = nodes.world_size();
  std::vector<int> everyone(nodes.world_size());
  for (int r = 0; r < nodes.world_size(); ++r) everyone[r] = r;
  plan.phases.push_back(make_phase(GroupRole::kWorld, std::move(everyone), rank, 1, {}));
  return plan;
}

// Two phases, intra-node then inter-node, with G ranks per node and N nodes:
//   1. order blocks as [dest local j][dest node, in the order of local j's
//      inter-node group]; all-to-all inside the node, N blocks per peer;
//   2. received as [src local i][dest node k]: reorder to [k][i];
//      all-to-all among the ranks with this local index, G blocks per peer;
//   3. received as [src node m][src local i]: reorder to source-rank order.
// Step 3 is the identity when every node holds consecutive ranks.
ExchangePlan hierarchical_plan(const NodeMap& nodes, int rank) {
  const int G = nodes.ranks_per_node();
  const int N = nodes.num_nodes();
  const int p = nodes.world_size();
  const int my_node = nodes.node_of(rank);
  const int my_local = nodes.local_index(rank);

  std::vector<std::vector<int>> rail(G);  // rail[j]: ranks with local index j
  for (int j = 0; j < G; ++j) rail[j] = nodes.ranks_with_local_index(j);

  ExchangePlan plan;
  plan.algorithm = Algorithm::kHierarchical;
  plan.world_size = p;
  plan.rank = rank;
  plan.num_blocks = p;

  Permutation to_local_major;
  to_local_major.reserve(p);
  for (int j = 0; j < G; ++j) {
    for (int dest : rail[j]) to_local_major.push_back(dest);
  }
  plan.phases.push_back(make_phase(GroupRole::kIntraNode, nodes.ranks_of_node(my_node), rank, N,
                                   std::move(to_local_major)));

  Permutation to_node_major(p);
  for (int k = 0; k < N; ++k) {
    for (int i = 0; i < G; ++i) to_node_major[k * G + i] = static_cast<int64_t>(i) * N + k;
  }
  plan.phases.push_back(make_phase(GroupRole::kInterNode, rail[my_local], rank, G, std::move(to_node_major)));

  // The peer at position m of this rank's inter-node group sent the blocks of
  // its node's ranks, in local-index order.
  std::vector<int> position_of_node(N, -1);
  for (int m = 0; m < N; ++m) position_of_node[nodes.node_of(rail[my_local][m])] = m;
  Permutation to_source_order(p);
  for (int s = 0; s < p; ++s) {
    to_source_order[s] = static_cast<int64_t>(position_of_node[nodes.node_of(s)]) * G + nodes.local_index(s);
  }
  plan.post_permutation = std::move(to_source_order);
  return plan;
}

ExchangePlan coordinated_plan(const NodeMap& nodes, int rank, int tp) {
  const int p = nodes.world_size();
  if (tp < 1 || p % tp != 0) {
    throw std::invalid_argument("tp=" + std::to_string(tp) + " must be >= 1 and divide world_size=" +
                                std::to_string(p));
  }
  ExchangePlan plan;
  plan.algorithm = Algorithm::kCoordinated;
  plan.world_size = p;
  plan.rank = rank;
  plan.tp = tp;
  plan.num_blocks = p;
  std::vector<int> same_tp_rank, tensor_group;
  for (int r = rank % tp; r < p; r += tp) same_tp_rank.push_back(r);
  for (int r = rank - rank % tp; r < rank - rank % tp + tp; ++r) tensor_group.push_back(r);
  plan.phases.push_back(make_phase(GroupRole::kExpert, std::move(same_tp_rank), rank, 1, {}));
  plan.phases.push_back(
      make_phase(GroupRole::kTensor, std::move(tensor_group), rank, p / tp, {}, Collective::kAllGather));
  return plan;
}

}  // namespace

// Folds a relabelling of the group's ranks into the first and last reorders.
void relabel(ExchangePlan& plan, const std::vector<int>& rank_order) {
  const int p = plan.world_size;
  if (static_cast<int>(rank_order.size()) != p) {
    throw std::invalid_argument("rank_order has " + std::to_string(rank_order.size()) +
                                " entries but the group has " + std::to_string(p) + " ranks");
  }
  if (plan.num_blocks != p) {
    throw std::invalid_argument("rank_order does not apply to the " + to_string(plan.algorithm) + " plan");
  }
  Permutation to_group_order(p, -1);  // group rank g's block is the caller's block i
  for (int i = 0; i < p; ++i) {
    const int g = rank_order[i];
    if (g < 0 || g >= p || to_group_order[g] != -1) {
      throw std::invalid_argument("rank_order must be a permutation of 0.." + std::to_string(p - 1) +
                                  "; entry " + std::to_string(i) + " is " + std::to_string(g));
    }
    to_group_order[g] = i;
  }
  const Permutation to_caller_order(rank_order.begin(), rank_order.end());
  if (plan.phases.empty()) {
    plan.post_permutation = compose(compose(to_group_order, plan.post_permutation), to_caller_order);
  } else {
    plan.phases.front().pre_permutation = compose(to_group_order, plan.phases.front().pre_permutation);
    plan.post_permutation = compose(plan.post_permutation, to_caller_order);
  }
}

ExchangePlan make_plan(const NodeMap& nodes, int rank, Algorithm algorithm, int tp,
                       const std::vector<int>& rank_order) {
  check_rank(nodes, rank);
  if (tp != 1 && algorithm != Algorithm::kCoordinated) {
    throw std::invalid_argument("tp=" + std::to_string(tp) + " applies to the coordinated algorithm only; " +
                                to_string(algorithm) + " takes tp=1");
  }
  ExchangePlan plan;
  switch (algorithm) {
    case Algorithm::kFlat: plan = flat_plan(nodes, rank); break;
    case Algorithm::kHierarchical: plan = hierarchical_plan(nodes, rank); break;
    case Algorithm::kCoordinated: plan = coordinated_plan(nodes, rank, tp); break;
  }
  if (!rank_order.empty()) relabel(plan, rank_order);
  simplify(plan);
  count_traffic(nodes, plan);
  return plan;
}

Algorithm parse_algorithm(const std::string& name) {
  if (name == "flat") return Algorithm::kFlat;
  if (name == "hierarchical") return Algorithm::kHierarchical;
  if (name == "coordinated") return Algorithm::kCoordinated;
  throw std::invalid_argument("unknown algorithm '" + name + "'; expected 'flat', 'hierarchical' or 'coordinated'");
}

std::string to_string(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::kFlat: return "flat";
    case Algorithm::kHierarchical: return "hierarchical";
    case Algorithm::kCoordinated: return "coordinated";
  }
  return "?";
}

std::string to_string(GroupRole role) {
  switch (role) {
    case GroupRole::kWorld: return "world";
    case GroupRole::kIntraNode: return "intra_node";
    case GroupRole::kInterNode: return "inter_node";
    case GroupRole::kExpert: return "expert";
    case GroupRole::kTensor: return "tensor";
  }
  return "?";
}

std::string to_string(Collective collective) {
  switch (collective) {
    case Collective::kAllToAll: return "all_to_all";
    case Collective::kAllGather: return "all_gather";
  }
  return "?";
}

}  // namespace alltoall::plan
