// An exchange plan: which blocks of a rank's buffer go to which peer, in which
// phase, over which group, and how blocks are reordered between phases.
// Pure data built from a NodeMap: no torch, no CUDA, no communication.
//
// A rank's buffer is a list of `num_blocks` blocks. For an all-to-all over a
// group of p ranks, block d holds the rows destined to group rank d. Blocks
// may differ in size (all-to-all-v); the plan only says how many blocks go to
// each peer, the executor tracks their sizes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "plan/node_map.h"

namespace alltoall::plan {

enum class Algorithm { kFlat, kHierarchical, kCoordinated };

// The communicator a phase runs on, relative to the group the plan is for.
enum class GroupRole {
  kWorld,      // the whole group
  kIntraNode,  // the ranks of this rank's node
  kInterNode,  // the ranks with this rank's local index, one per node
  kExpert,     // coordinated: the ranks that share this rank's tensor-parallel rank
  kTensor,     // coordinated: this rank's tensor-parallel group
};

enum class Collective { kAllToAll, kAllGather };

enum class LinkClass { kIntraNode, kInterNode };

struct Phase {
  Collective collective = Collective::kAllToAll;
  GroupRole role = GroupRole::kWorld;
  // Ranks of the phase's group (ranks of the plan's group), ascending: the
  // order torch.distributed.new_group gives its members.
  std::vector<int> group_ranks;
  int index_in_group = 0;
  // All-to-all: consecutive blocks sent to each peer, in peer order.
  // All-gather: the blocks this rank contributes to every member.
  int blocks_per_peer = 1;
  // Reorder applied before the phase: block i of the new list is block
  // pre_permutation[i] of the current list. Empty means identity.
  std::vector<int64_t> pre_permutation;
};

// Per-rank traffic on one class of link, counting messages to other ranks
// only. `blocks` is in units of one block of the rank's send buffer.
// `counts` is the number of int64 row counts an uneven exchange sends ahead
// of the data when output splits are not given: one per block, so O(p).
struct LinkTraffic {
  int64_t messages = 0;
  int64_t blocks = 0;
  int64_t counts = 0;
};

struct ExchangePlan {
  Algorithm algorithm = Algorithm::kFlat;
  int world_size = 1;
  int rank = 0;
  int tp = 1;
  int num_blocks = 1;
  std::vector<Phase> phases;
  // Reorder applied after the last phase (same convention as pre_permutation).
  std::vector<int64_t> post_permutation;
  LinkTraffic intra_node;
  LinkTraffic inter_node;
};

// Builds the plan of `rank`. Throws std::invalid_argument naming the value
// when the algorithm cannot run on this node layout.
//
// The coordinated plan (DeepSpeed-MoE section 5.3) is for `world_size`
// ranks in tensor-parallel groups of `tp` consecutive ranks whose input is
// replicated inside each group. Its buffer has world_size blocks: for every
// one of the world_size/tp expert-parallel destinations, one block per TP
// rank. Phase 1 sends this rank's block for every destination to the ranks
// that share its TP rank; phase 2 all-gathers the results inside the TP
// group, which rebuilds the replicated output.
//
// `rank_order`, when not empty, relabels the group: the caller's block i goes
// to group rank rank_order[i] and its output block i comes from that rank.
// The relabelling folds into the first and last reorders, so it costs nothing
// beyond them. ParallelGroups uses it to index EP ranks by their expert
// coordinate when group order (ascending global rank) differs from it.
ExchangePlan make_plan(const NodeMap& nodes, int rank, Algorithm algorithm, int tp = 1,
                       const std::vector<int>& rank_order = {});

Algorithm parse_algorithm(const std::string& name);
std::string to_string(Algorithm algorithm);
std::string to_string(GroupRole role);
std::string to_string(Collective collective);

}  // namespace alltoall::plan
