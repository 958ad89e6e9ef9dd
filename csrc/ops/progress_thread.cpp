#include "ops/progress_thread.h"

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <system_error>

namespace alltoall::ops {

namespace {

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

// Work -----------------------------------------------------------------------

bool Work::is_completed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

ExchangeResult Work::wait() const {
  std::unique_lock<std::mutex> lock(mutex_);
  done_cv_.wait(lock, [&] { return done_; });
  if (error_) std::rethrow_exception(error_);
  return result_;
}

std::pair<int64_t, int64_t> Work::span_us() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {started_us_, finished_us_};
}

std::function<ExchangeResult()> Work::take_spent() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::function<ExchangeResult()> out;
  if (done_) out.swap(spent_);
  return out;
}

void Work::start() {
  std::lock_guard<std::mutex> lock(mutex_);
  started_us_ = now_us();
}

void Work::finish(ExchangeResult result, std::exception_ptr error, std::function<ExchangeResult()> spent) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    result_ = std::move(result);
    error_ = std::move(error);
    spent_ = std::move(spent);
    finished_us_ = now_us();
    done_ = true;
  }
  done_cv_.notify_all();
}

// ProgressThread -----------------------------------------------------------

ProgressThread::ProgressThread(std::string name)
    : name_(std::move(name)), intra_op_threads_(at::get_num_threads()) {}

ProgressThread::~ProgressThread() {
  std::vector<Entry> done;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    // Submitted work runs to the end: the peers take part in the same
    // exchanges, and each is bounded by its transport's timeout.
    changed_.wait(lock, [&] { return queue_.empty() && !busy_; });
    stopping_ = true;
    done = take_finished();
  }
  changed_.notify_all();
  if (worker_.joinable()) worker_.join();
}

std::vector<ProgressThread::Entry> ProgressThread::take_finished() {
  std::vector<Entry> out;
  out.swap(finished_);
  return out;
}

std::shared_ptr<Work> ProgressThread::submit(Task task, std::string label) {
  auto work = std::make_shared<Work>(label);
  std::vector<Entry> done;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!stopping_, "alltoall: ", name_, " is shutting down; cannot queue ", label);
    // The worker first: a thread that cannot be created (EAGAIN) must not
    // leave a queued task behind that synchronize() and the destructor
    // would wait for forever.
    if (!worker_.joinable()) {
      try {
        worker_ = std::thread([this] { loop(); });
      } catch (const std::system_error& error) {
        TORCH_CHECK(false, "alltoall: ", name_, ": cannot start its progress thread for ", label, ": ", error.what());
      }
    }
    queue_.push_back(Entry{std::move(task), work, c10::ThreadLocalDebugInfo::current(),
                           at::get_record_function_tls_()});
    done = take_finished();
  }
  changed_.notify_all();
  return work;
}

ExchangeResult ProgressThread::run(const Task& task, const std::string& label) {
  std::vector<Entry> done;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done = take_finished();
    if (!queue_.empty() || busy_) {
      lock.unlock();
      return submit(task, label)->wait();
    }
    busy_ = true;
  }
  // Nothing in flight: run here, saving the hop to the worker.
  struct Release {
    ProgressThread* self;
    ~Release() {
      {
        std::lock_guard<std::mutex> lock(self->mutex_);
        self->busy_ = false;
      }
      self->changed_.notify_all();
    }
  } release{this};
  // As on the worker: tasks must not build autograd graphs.
  c10::AutoGradMode no_grad(false);
  RECORD_FUNCTION(label, std::vector<c10::IValue>());
  return task();
}

void ProgressThread::synchronize() {
  std::vector<Entry> done;
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return queue_.empty() && !busy_; });
  done = take_finished();
  lock.unlock();
}

size_t ProgressThread::in_flight() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size() + (busy_ ? 1 : 0);
}

bool ProgressThread::started() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return worker_.joinable();
}

void ProgressThread::loop() {
  pthread_setname_np(pthread_self(), "alltoall-progr");  // at most 15 characters
  // A new native thread starts with OpenMP's default team size; keep the
  // owner's (tests and benchmarks give each rank one thread).
  at::set_num_threads(intra_op_threads_);
  // Tasks compute on tensors that may require grad; they must not build
  // autograd graphs (the callers attach autograd themselves).
  c10::AutoGradMode no_grad(false);
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    changed_.wait(lock, [&] { return stopping_ || (!queue_.empty() && !busy_); });
    if (queue_.empty()) {
      if (stopping_) return;
      continue;
    }
    Entry entry = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lock.unlock();
    execute(entry);
    lock.lock();
    busy_ = false;
    finished_.push_back(std::move(entry));
    changed_.notify_all();
  }
}

void ProgressThread::execute(Entry& entry) {
  const auto saved_debug = c10::ThreadLocalDebugInfo::current();
  const auto saved_rf = at::get_record_function_tls_();
  c10::ThreadLocalDebugInfo::_forceCurrentDebugInfo(entry.debug_info);
  at::set_record_function_tls_(entry.record_function_tls);
  entry.work->start();
  ExchangeResult result;
  std::exception_ptr error;
  {
    RECORD_FUNCTION(entry.work->label(), std::vector<c10::IValue>());
    try {
      result = entry.task();
    } catch (...) {
      error = std::current_exception();
    }
  }
  // The task goes with its result: the owner's wait() releases its inputs
  // (not the owner's next call, which may come much later).
  entry.work->finish(std::move(result), std::move(error), std::move(entry.task));
  entry.task = nullptr;
  at::set_record_function_tls_(saved_rf);
  c10::ThreadLocalDebugInfo::_forceCurrentDebugInfo(saved_debug);
  // The profiler's state must not outlive the task on this thread.
  entry.debug_info.reset();
}

}  // namespace alltoall::ops
