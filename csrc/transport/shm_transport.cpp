#include "transport/shm_transport.h"

#include <c10/util/Exception.h>

#include <mutex>
#include <sstream>

#include "transport/shm_error.h"

namespace alltoall::transport {

namespace {

int64_t row_bytes(const at::Tensor& t) {
  int64_t n = static_cast<int64_t>(t.element_size());
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

std::vector<int64_t> equal_or(const std::vector<int64_t>& splits, int64_t rows, int size) {
  if (!splits.empty()) return splits;
  return std::vector<int64_t>(size, rows / size);
}

class ShmTransport final : public Transport {
 public:
  ShmTransport(ShmProtocol protocol, std::string group_name, std::string host, std::shared_ptr<Transport> fallback)
      : protocol_(std::move(protocol)),
        group_name_(std::move(group_name)),
        host_(std::move(host)),
        fallback_(std::move(fallback)) {}

  int size() const override { return protocol_.segment().size(); }
  int rank() const override { return protocol_.segment().rank(); }
  std::string kind() const override { return "shm"; }

  void all_to_all(at::Tensor& output, at::Tensor& input, const std::vector<int64_t>& output_splits,
                  const std::vector<int64_t>& input_splits, const std::string& what) override {
    if (!host_memory(input, output)) {
      fallback_for(what)->all_to_all(output, input, output_splits, input_splits, what);
      return;
    }
    TORCH_CHECK(input.is_contiguous() && output.is_contiguous(), "alltoall: ", what,
                ": the shared-memory transport needs contiguous tensors");
    const int p = size();
    const auto in = equal_or(input_splits, input.size(0), p);
    const auto out = equal_or(output_splits, output.size(0), p);
    const int64_t in_row = row_bytes(input), out_row = row_bytes(output);
    std::vector<PeerTransfer> transfers(p);
    const auto* send = static_cast<const uint8_t*>(input.const_data_ptr());
    auto* recv = static_cast<uint8_t*>(output.data_ptr());
    for (int j = 0; j < p; ++j) {
      transfers[j].send = send;
      transfers[j].send_bytes = static_cast<size_t>(in[j] * in_row);
      transfers[j].recv = recv;
      transfers[j].recv_bytes = static_cast<size_t>(out[j] * out_row);
      send += transfers[j].send_bytes;
      recv += transfers[j].recv_bytes;
    }
    run(transfers, what);
  }

  void all_gather(at::Tensor& output, at::Tensor& input, const std::string& what) override {
    if (!host_memory(input, output)) {
      fallback_for(what)->all_gather(output, input, what);
      return;
    }
    TORCH_CHECK(input.is_contiguous() && output.is_contiguous(), "alltoall: ", what,
                ": the shared-memory transport needs contiguous tensors");
    const size_t bytes = input.nbytes();
    TORCH_CHECK(output.nbytes() == bytes * static_cast<size_t>(size()), "alltoall: ", what, ": all_gather output has ",
                output.nbytes(), " bytes, expected ", bytes * size());
    std::vector<PeerTransfer> transfers(size());
    auto* recv = static_cast<uint8_t*>(output.data_ptr());
    for (int j = 0; j < size(); ++j) {
      transfers[j] = {static_cast<const uint8_t*>(input.const_data_ptr()), bytes, recv + j * bytes, bytes};
    }
    run(transfers, what);
  }

  void abort(const std::string& reason) noexcept override { protocol_.abort(reason); }

  // Not under mutex_: a test pokes between calls.
  ShmProtocol& protocol() { return protocol_; }

  std::string describe() const override {
    const auto& ranks = protocol_.segment().global_ranks();
    std::ostringstream out;
    out << "group '" << group_name_ << "' (global ranks [";
    const size_t shown = std::min<size_t>(ranks.size(), 16);
    for (size_t i = 0; i < shown; ++i) out << (i ? ", " : "") << ranks[i];
    if (shown < ranks.size()) out << ", ... " << ranks.size() << " in all";
    out << "], this rank is " << rank() << " of " << size() << "; shared memory on host " << host_ << ")";
    return out.str();
  }

 private:
  static bool host_memory(const at::Tensor& a, const at::Tensor& b) { return a.is_cpu() && b.is_cpu(); }

  Transport* fallback_for(const std::string& what) const {
    TORCH_CHECK_VALUE(fallback_ != nullptr, "alltoall: ", what, " on ", describe(),
                      ": the shared-memory transport moves host tensors only and this group has no fallback");
    return fallback_.get();
  }

  void run(const std::vector<PeerTransfer>& transfers, const std::string& what) {
    // One exchange at a time per group: the rings are streams.
    std::lock_guard<std::mutex> lock(mutex_);
    try {
      protocol_.exchange(transfers);
    } catch (const ShmError& error) {
      TORCH_CHECK_WITH(DistBackendError, false, "alltoall: ", what, " on ", describe(), " failed (timeout ",
                       protocol_.segment().timeout().count(), " ms): ", error.what());
    }
  }

  ShmProtocol protocol_;
  std::string group_name_;
  std::string host_;
  std::shared_ptr<Transport> fallback_;
  std::mutex mutex_;
};

}  // namespace

std::shared_ptr<Transport> make_shm_transport(ShmTransportSpec spec, ShmSegment* created) {
  const int members = static_cast<int>(spec.segment.global_ranks.size());
  spec.segment.bytes = ShmProtocol::payload_bytes(members, spec.protocol.ring_bytes);
  try {
    if (spec.segment.rank == 0 && created == nullptr) {
      throw ShmError("group rank 0 must create the segment before publishing its name (create_shm_segment)");
    }
    ShmSegment segment = created != nullptr ? std::move(*created) : ShmSegment::attach(spec.segment);
    // The protocol's set-up barrier means every member has attached.
    ShmProtocol protocol(std::move(segment), spec.protocol);
    protocol.segment().unlink();
    return std::make_shared<ShmTransport>(std::move(protocol), spec.group_name, spec.host, spec.fallback);
  } catch (const ShmError& error) {
    ShmSegment::unlink_name(spec.segment.name);
    TORCH_CHECK_WITH(DistBackendError, false, "alltoall: shared-memory set-up of group '", spec.group_name,
                     "' (rank ", spec.segment.rank, " of ", members, ") failed: ", error.what());
  }
}

ShmSegment create_shm_segment(ShmTransportSpec spec) {
  const int members = static_cast<int>(spec.segment.global_ranks.size());
  spec.segment.bytes = ShmProtocol::payload_bytes(members, spec.protocol.ring_bytes);
  return ShmSegment::create(spec.segment);
}

void shm_test_poke(Transport& transport, const std::string& field, int peer, const std::vector<uint64_t>& values) {
  auto* shm = dynamic_cast<ShmTransport*>(&transport);
  TORCH_CHECK_VALUE(shm != nullptr, "shm_test_poke needs a shared-memory transport, got ", transport.kind());
  shm->protocol().test_poke(field, peer, values);
}

}  // namespace alltoall::transport
