#include "transport/c10d_transport.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <sstream>
#include <thread>
#include <type_traits>

namespace alltoall::transport {

namespace {

class C10dTransport final : public Transport {
 public:
  C10dTransport(std::string group_name, std::vector<int> global_ranks, std::chrono::milliseconds timeout)
      : name_(std::move(group_name)), ranks_(std::move(global_ranks)), timeout_(timeout) {
    group_ = c10d::resolve_process_group(name_);
    backend_name_ = group_->getBackendName();
    check_size(group_->getSize());
  }

  // Over a bare Backend: the same waits and errors, without a registered group.
  C10dTransport(c10::intrusive_ptr<c10d::Backend> backend, std::string name, std::vector<int> global_ranks,
                std::chrono::milliseconds timeout)
      : name_(std::move(name)), ranks_(std::move(global_ranks)), timeout_(timeout), backend_(std::move(backend)) {
    TORCH_CHECK_VALUE(backend_, "no backend given for group '", name_, "'");
    backend_name_ = backend_->getBackendName();
    check_size(backend_->getSize());
  }

  int size() const override { return group_ ? group_->getSize() : backend_->getSize(); }
  int rank() const override { return group_ ? group_->getRank() : backend_->getRank(); }
  std::string kind() const override { return "c10d:" + backend_name_; }

  void all_to_all(at::Tensor& output, at::Tensor& input, const std::vector<int64_t>& output_splits,
                  const std::vector<int64_t>& input_splits, const std::string& what) override {
    c10d::AllToAllOptions options;
    options.timeout = timeout_;
    std::vector<int64_t> out_splits = output_splits;
    std::vector<int64_t> in_splits = input_splits;
    run(what, input.device(), [&] {
      return group_ ? group_->all_to_all_single(output, input, out_splits, in_splits, options)
                    : backend_->alltoall_base(output, input, out_splits, in_splits, options);
    });
  }

  void all_gather(at::Tensor& output, at::Tensor& input, const std::string& what) override {
    c10d::AllgatherOptions options;
    options.timeout = timeout_;
    run(what, input.device(), [&] {
      return group_ ? group_->all_gather_single(output, input, options)
                    : backend_->_allgather_base(output, input, options);
    });
  }

  // Issues one collective and waits for it, turning any failure into an
  // error that names the step and the group.
  template <typename Issue>
  void run(const std::string& what, const at::Device& device, Issue&& issue) const {
    try {
      auto work = issue();
      if (waits_on_stream(device)) {
        // NCCL: make the current stream wait for the collective's end event
        // and return at once, so the host keeps running ahead. A finite
        // timeout here would make ProcessGroupNCCL poll on the host until the
        // GPU finished. The bound is the group's own timeout: its watchdog
        // aborts the communicator when a collective overruns it.
        work->wait();
      } else if (!work->wait(timeout_)) {
        // Host backends (gloo): wait(timeout) throws when the timeout passes
        // and rethrows the backend's own error (its per-operation timeout).
        C10_THROW_ERROR(DistBackendError, "did not complete within " + std::to_string(timeout_.count()) + " ms");
      }
      release_here(std::move(work));
    } catch (const c10::DistNetworkError& error) {
      fail<c10::DistNetworkError>(what, error.what_without_backtrace());
    } catch (const c10::DistStoreError& error) {
      fail<c10::DistStoreError>(what, error.what_without_backtrace());
    } catch (const c10::DistError& error) {
      // DistBackendError and DistError itself: timeouts, aborted
      // communicators, dead peers. Python sees torch.distributed's class.
      fail<c10::DistBackendError>(what, error.what_without_backtrace());
    } catch (const c10::Error& error) {
      // The backend's message without its C++ backtrace: ours is enough.
      fail<c10::Error>(what, error.what_without_backtrace());
    } catch (const std::exception& error) {
      fail<c10::Error>(what, error.what());
    }
  }

  // NCCL completes on the GPU: its work is waited for on the stream. Every
  // other backend completes on the host and is waited for with a bound.
  // Decided per call: a group with "cpu:gloo,cuda:nccl" uses either.
  bool waits_on_stream(const at::Device& device) const {
    if (!device.is_cuda()) return false;
    return (group_ ? group_->getBackend(device.type())->getBackendName() : backend_name_) == "nccl";
  }

  // Rethrows as the class of the original error (Python keeps seeing
  // torch.distributed.DistBackendError and its siblings, which are
  // RuntimeErrors), with the step, the group and the timeout in front.
  template <typename ErrorType>
  [[noreturn]] void fail(const std::string& what, const char* cause) const {
    std::ostringstream message;
    message << "alltoall: " << what << " on " << describe() << " failed (timeout " << timeout_.count()
            << " ms): " << cause;
    if constexpr (std::is_same_v<ErrorType, c10::Error>) {
      TORCH_CHECK(false, message.str());
    } else {
      throw ErrorType({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, message.str());
    }
  }

  // A gloo work object captures the caller's thread-local state, which can
  // hold Python objects (inside autograd's backward it does). If gloo's worker
  // thread dropped the last reference it would need the GIL, and at
  // interpreter exit Python kills threads that wait for the GIL, which
  // aborts the process. So wait the few microseconds until the worker has
  // let go, and release the work on this thread. The wait is capped: if
  // something else keeps the work alive (torch can register it with its
  // output tensor), the call must not stall.
  void release_here(c10::intrusive_ptr<c10d::Work> work) const {
    if (backend_name_ != "gloo") return;
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(5);
    while (work.use_count() > 1 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
  }

  std::string describe() const override {
    std::ostringstream out;
    out << "group '" << name_ << "' (global ranks [";
    const size_t shown = std::min<size_t>(ranks_.size(), 16);
    for (size_t i = 0; i < shown; ++i) out << (i ? ", " : "") << ranks_[i];
    if (shown < ranks_.size()) out << ", ... " << ranks_.size() << " in all";
    out << "], this rank is " << rank() << " of " << size() << ")";
    return out.str();
  }

 private:
  void check_size(int size) const {
    TORCH_CHECK_VALUE(size == static_cast<int>(ranks_.size()), "process group '", name_, "' has ", size,
                      " ranks but ", ranks_.size(), " were given");
  }

  std::string name_;
  std::vector<int> ranks_;
  std::chrono::milliseconds timeout_;
  // Exactly one of the two is set.
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  c10::intrusive_ptr<c10d::Backend> backend_;
  std::string backend_name_;
};

}  // namespace

std::shared_ptr<Transport> make_c10d_transport(const std::string& group_name, std::vector<int> global_ranks,
                                               std::chrono::milliseconds timeout) {
  return std::make_shared<C10dTransport>(group_name, std::move(global_ranks), timeout);
}

std::shared_ptr<Transport> make_backend_transport(c10::intrusive_ptr<c10d::Backend> backend, const std::string& name,
                                                  std::vector<int> global_ranks, std::chrono::milliseconds timeout) {
  return std::make_shared<C10dTransport>(std::move(backend), name, std::move(global_ranks), timeout);
}

}  // namespace alltoall::transport
