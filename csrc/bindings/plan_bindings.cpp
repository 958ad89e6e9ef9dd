#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/register.h"
#include "plan/exchange_plan.h"

namespace py = pybind11;

namespace alltoall::bindings {

void register_plan(py::module_& m) {
  using namespace alltoall::plan;

  py::class_<Phase>(m, "Phase", "One phase of an exchange plan (pure data).")
      .def_property_readonly("collective", [](const Phase& p) { return to_string(p.collective); })
      .def_property_readonly("role", [](const Phase& p) { return to_string(p.role); })
      .def_readonly("group_ranks", &Phase::group_ranks)
      .def_readonly("index_in_group", &Phase::index_in_group)
      .def_readonly("blocks_per_peer", &Phase::blocks_per_peer)
      .def_readonly("pre_permutation", &Phase::pre_permutation)
      .def("__repr__", [](const Phase& p) {
        return "Phase(" + to_string(p.collective) + " over " + to_string(p.role) + " of " +
               std::to_string(p.group_ranks.size()) + " ranks, " + std::to_string(p.blocks_per_peer) +
               " blocks per peer)";
      });

  py::class_<LinkTraffic>(m, "LinkTraffic", "Per-rank messages and blocks on one class of link.")
      .def_readonly("messages", &LinkTraffic::messages)
      .def_readonly("blocks", &LinkTraffic::blocks)
      .def_readonly("counts", &LinkTraffic::counts);

  py::class_<ExchangePlan>(m, "ExchangePlan", "The exchange plan of one rank (pure data).")
      .def_property_readonly("algorithm", [](const ExchangePlan& p) { return to_string(p.algorithm); })
      .def_readonly("world_size", &ExchangePlan::world_size)
      .def_readonly("rank", &ExchangePlan::rank)
      .def_readonly("tp", &ExchangePlan::tp)
      .def_readonly("num_blocks", &ExchangePlan::num_blocks)
      .def_readonly("phases", &ExchangePlan::phases)
      .def_readonly("post_permutation", &ExchangePlan::post_permutation)
      .def_readonly("intra_node", &ExchangePlan::intra_node)
      .def_readonly("inter_node", &ExchangePlan::inter_node);

  m.def(
      "make_plan",
      [](std::vector<int> node_of_rank, int rank, const std::string& algorithm, int tp,
         const std::vector<int>& rank_order) {
        return make_plan(NodeMap(std::move(node_of_rank)), rank, parse_algorithm(algorithm), tp, rank_order);
      },
      py::arg("node_of_rank"), py::arg("rank"), py::arg("algorithm"), py::arg("tp") = 1,
      py::arg("rank_order") = std::vector<int>{},
      "Builds the plan of `rank` for a group whose rank r sits on node node_of_rank[r].");
}

}  // namespace alltoall::bindings
