// One FIFO worker per Communicator: asynchronous exchanges run on it, off the
// calling thread and without the GIL, in the order they were issued.
//
// A transport is an ordered stream (the shared-memory transport checks a
// per-call sequence number; c10d assigns tags in issue order), so every call
// of a Communicator, synchronous or not, goes through its ProgressThread:
// `run` executes on the calling thread when nothing is queued or running,
// and otherwise queues behind the work in flight and waits for its turn.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace alltoall::ops {

// What an exchange returns: the output and, for uneven exchanges, the rows
// received from each peer.
struct ExchangeResult {
  at::Tensor output;
  std::vector<int64_t> splits;
};

// The handle of one queued task, in the manner of c10d::Work.
class Work {
 public:
  explicit Work(std::string label) : label_(std::move(label)) {}

  bool is_completed() const;
  // Blocks until the task has run; returns its result or rethrows its error.
  // Bounded: every wait inside a task is bounded by the transport's timeout.
  ExchangeResult wait() const;
  const std::string& label() const { return label_; }
  // Microseconds since the epoch of steady_clock when the task started and
  // finished on the worker (0 while not yet); for timelines and tests.
  std::pair<int64_t, int64_t> span_us() const;

  void start();
  // `spent` is the finished task itself: what it captured (its inputs) is
  // kept here, no longer in the queue, until `take_spent` hands it to a
  // thread that may release it.
  void finish(ExchangeResult result, std::exception_ptr error, std::function<ExchangeResult()> spent = {});
  // The finished task, for the caller to destroy on its own thread (empty
  // before the task finished, and after the first take). Only owner threads
  // call it (the Python bindings of wait and is_completed): releasing a
  // captured tensor may need the GIL, which the worker never takes.
  std::function<ExchangeResult()> take_spent();

 private:
  std::string label_;
  mutable std::mutex mutex_;
  mutable std::condition_variable done_cv_;
  bool done_ = false;
  ExchangeResult result_;
  std::exception_ptr error_;
  std::function<ExchangeResult()> spent_;
  int64_t started_us_ = 0;
  int64_t finished_us_ = 0;
};

class ProgressThread {
 public:
  using Task = std::function<ExchangeResult()>;

  // `name` names the owner in the thread's name and in errors.
  explicit ProgressThread(std::string name);
  // Runs everything already submitted, then joins the worker. Must not run
  // on the worker itself (tasks never own a ProgressThread).
  ~ProgressThread();
  ProgressThread(const ProgressThread&) = delete;
  ProgressThread& operator=(const ProgressThread&) = delete;

  // Queues `task`; the worker starts on first use.
  std::shared_ptr<Work> submit(Task task, std::string label);
  // Runs `task` in order with the queued work: inline when the queue is
  // idle, otherwise queued and waited for.
  ExchangeResult run(const Task& task, const std::string& label);
  // Waits until everything submitted so far has run.
  void synchronize();
  // Tasks queued or running.
  size_t in_flight() const;
  // Whether the worker thread exists.
  bool started() const;

 private:
  struct Entry {
    Task task;
    std::shared_ptr<Work> work;
    // The submitter's profiler state, so a torch.profiler trace shows the
    // task on the worker's row.
    std::shared_ptr<c10::ThreadLocalDebugInfo> debug_info;
    at::RecordFunctionTLS record_function_tls;
  };

  void loop();
  void execute(Entry& entry);
  // Drops finished entries on the owner's thread: a task's captured tensors
  // may be owned by Python objects, and releasing those needs the GIL, which
  // the worker must never take (it could be killed at interpreter exit).
  // The caller lets the returned entries go after unlocking the mutex.
  // A finished entry no longer holds its task (the Work does, until the
  // owner's wait or is_completed releases it); it holds the Work, so that
  // the Work's last reference never goes on the worker.
  std::vector<Entry> take_finished();

  std::string name_;
  int intra_op_threads_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Entry> queue_;
  std::vector<Entry> finished_;
  bool busy_ = false;  // a task is running, on the worker or inline
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace alltoall::ops
